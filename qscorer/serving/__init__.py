"""The scoring service (``qscorer serve``): FastAPI app, dynamic batching, web page; needs the ``serve`` extra.

- :func:`create_app` (``app.py``): the ASGI app around a ``Scorer``, with :class:`ServeSettings`.
- :func:`serve` / :func:`background_server` (``server.py``): run it with uvicorn, in the foreground or a thread.
- ``batcher.py``: concurrent requests' images grouped into model batches; ``uploads.py``: request bodies to pixels.
"""

from ..errors import QScorerError

try:
    import fastapi  # noqa: F401
    import python_multipart  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as error:
    raise QScorerError(
        f"the scoring service needs the serve extra ({error.name} is missing): pip install 'qscorer[serve]'"
    ) from None

from .app import ServeSettings, create_app
from .server import background_server, serve

__all__ = ["ServeSettings", "background_server", "create_app", "serve"]
