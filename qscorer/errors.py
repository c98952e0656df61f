"""User-facing errors: the CLI prints them as one line and exits with status 2. :class:`QScorerError` is defined
with the model (whose image processing raises it, also in remote code) and is public here."""

from .model.errors import QScorerError

__all__ = ["QScorerError"]
