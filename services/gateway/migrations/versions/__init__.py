"""The gateway database's revisions, oldest first (``rev_<id>_<what>.py``; Alembic skips this file)."""
