"""A minimal valid PgCat-format config with a slot for extra [general] lines."""

MINIMAL = """
[general]
admin_username = "a"
admin_password = "b"
{general}

[pools.app.users.0]
username = "u"
password = "p"
pool_size = 2

[pools.app.shards.0]
database = "app"
servers = [["127.0.0.1", 5432, "primary"]]
"""

PRIMARY_ONLY = '[["127.0.0.1", 5432, "primary"]]'


def minimal_config(general: str = "", pool: str = "", servers: str = PRIMARY_ONLY) -> str:
    """MINIMAL with ``general`` lines in [general], ``pool`` keys in [pools.app] and the shard's ``servers``."""
    text = MINIMAL.format(general=general).replace(f"servers = {PRIMARY_ONLY}", f"servers = {servers}")
    return text + f"\n[pools.app]\n{pool}\n" if pool else text
