"""Release lifecycle of a data directory: its format and migrations, backup and restore."""
