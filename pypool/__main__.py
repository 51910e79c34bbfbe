from pypool.cli import main

raise SystemExit(main())
