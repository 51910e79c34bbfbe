"""A client's session, sans-IO: its states, request tracking, prepared statements and settings."""
