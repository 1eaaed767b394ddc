"""Everything of Vigil that touches Kafka, bytes, files and time."""


class MissingExtra(ImportError):
    """An optional extra is not installed (psycopg for a PostgreSQL queue store, gunicorn for
    ``--workers``); the message says what to install. The command line says it in one line, where
    any other ``ImportError`` is a bug and keeps its traceback."""
