"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class QScorerError(Exception):
    """An error caused by the user's input (a path, a file's content, a flag); its message names that input."""
