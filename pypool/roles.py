"""The roles a transaction can ask the pool group for."""

PRIMARY = "primary"  # the server that takes writes
REPLICA = "replica"  # a standby, for reads
ANY = "any"  # any server: replicas and the primary
