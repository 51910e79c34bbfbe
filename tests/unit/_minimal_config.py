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
