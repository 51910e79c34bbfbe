from pypool import process_signals

process_signals.defer()  # first: a SIGTERM during the imports below drains after start-up instead of killing
from pypool.cli import main  # noqa: E402

raise SystemExit(main())
