"""The HTTP service: FastAPI routes over one ``Scorer`` (``qscorer serve`` runs it with uvicorn).

``POST /score`` reads the uploads (:mod:`.uploads`), decodes them in worker threads, scores them through the
:class:`~.batcher.DynamicBatcher` and answers ``{"results": [...]}`` in request order; ``GET /health`` and
``GET /info`` describe the service; ``GET /`` is the web page (``static/``). Errors are JSON
``{"error": message, "part": part or null}`` with a 4xx status (503 + Retry-After when the queue is full).
"""

from __future__ import annotations

import asyncio
import hmac
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from .. import __version__
from ..constants import SCORE_TOKENS_REPORT_ORDER
from ..errors import QScorerError
from .batcher import DynamicBatcher, QueueFullError
from .uploads import FIELD, RequestError, decode_upload, read_uploads

STATIC = Path(__file__).with_name("static")
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServeSettings:
    """Limits and access of the service (the model's batch size is the scorer's ``batch_size``)."""

    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_image_bytes: int = 16 * 2**20
    max_images_per_request: int = 64
    api_key: str | None = None
    decode_threads: int = 4

    def __post_init__(self):
        for name, flag in (("max_queue", "max-queue"), ("max_image_bytes", "max-image-bytes"),
                           ("max_images_per_request", "max-images-per-request"),
                           ("decode_threads", "decode threads (--num-workers)")):
            if getattr(self, name) < 1:
                raise QScorerError(f"{flag} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise QScorerError(f"max-wait-ms must be 0 or more, got {self.max_wait_ms}")
        if self.max_images_per_request > self.max_queue:
            raise QScorerError(
                f"max-images-per-request ({self.max_images_per_request}) cannot exceed max-queue ({self.max_queue}):"
                " such a request could never be admitted"
            )

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: every image at the limit, base64-encoded, plus room for the framing."""
        return self.max_images_per_request * (self.max_image_bytes * 4 // 3 + 4096) + 65536


class ImageResult(BaseModel):
    """One image's result: the fields of ``qscorer score --format json`` plus the five probabilities."""

    image: str = Field(description="the part's filename (multipart) or images[i] (JSON)")
    score: float = Field(description="quality score, about 1 (bad) .. 5 (excellent); clamped to [0, 5] by default")
    logits: dict[str, float] = Field(description="logits of <score5> .. <score1> at the appended token")
    probs: dict[str, float] = Field(description="their probabilities (softmax over the whole vocabulary)")
    token_id: int = Field(description="the token the model appended after the prompt")


class ScoreResponse(BaseModel):
    results: list[ImageResult] = Field(description="one result per image, in request order")


class ErrorResponse(BaseModel):
    error: str = Field(description="one line naming the problem")
    part: str | None = Field(None, description="the image part it concerns, e.g. images[1] (cat.txt)")


ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "malformed body (JSON, base64, form fields) or too many images",
    401: "missing or wrong API key",
    413: "an image or the whole body over its size limit",
    415: "neither multipart/form-data nor application/json",
    422: "a part that is empty or not a readable image",
    503: "the queue is full: retry after Retry-After seconds",
}.items()}

def _image_list_body(items: dict, **details) -> dict:
    """The OpenAPI schema of a body whose required ``images`` field is an array of ``items``."""
    images = {"type": "array", "items": items, **details}
    return {"schema": {"type": "object", "properties": {FIELD: images}, "required": [FIELD]}}


SCORE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": _image_list_body({"type": "string", "format": "binary"}),
            "application/json": _image_list_body(
                {"type": "string", "format": "byte"}, description="base64 image files (or data: URLs)"
            ),
        },
    }
}


def create_app(scorer, settings: ServeSettings | None = None, *, model_info: dict | None = None) -> FastAPI:
    """The service around ``scorer``. ``GET /info`` shows the loaded checkpoint (kind, folders, quantization) and
    ``model_info`` (e.g. the locations and loading options as requested)."""
    settings = settings or ServeSettings()
    batcher = DynamicBatcher(scorer, max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue)
    decoders = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="qscorer-decode")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()
        decoders.shutdown()

    app = FastAPI(
        title="qscorer",
        version=__version__,
        description="Image quality scores from a Q-Scorer checkpoint, with dynamic batching.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    _add_error_handlers(app)
    authorized = Depends(_api_key_check(settings.api_key))

    @app.post("/score", response_model=ScoreResponse, responses=ERRORS, openapi_extra=SCORE_BODY,
              dependencies=[authorized])
    async def score(request: Request):
        """Score one or more images: multipart file parts named `images`, or JSON `{"images": [base64, ...]}`."""
        uploads = await read_uploads(request, settings.max_images_per_request, settings.max_image_bytes)
        with batcher.admit(len(uploads)):
            loop = asyncio.get_running_loop()
            decoded = await asyncio.gather(
                *(loop.run_in_executor(decoders, decode_upload, upload) for upload in uploads), return_exceptions=True
            )
            failed = next((outcome for outcome in decoded if isinstance(outcome, BaseException)), None)
            if failed is not None:
                raise failed
            results = await batcher.score([upload.name for upload in uploads], decoded)
        records = [{key: value for key, value in asdict(result).items() if key != "error"} for result in results]
        return JSONResponse({"results": records})

    @app.get("/health")
    async def health():
        """Liveness, the images in the queue, whether an API key is needed, and the batch sizes so far."""
        return {
            "status": "ok",
            "queued_images": batcher.admitted,
            "api_key_required": settings.api_key is not None,
            "batch_sizes": {str(size): count for size, count in sorted(batcher.batch_sizes.items())},
        }

    @app.get("/info", dependencies=[authorized])
    async def info():
        """The model (paths, loading options, dtype, device), the scoring prompt and the service limits."""
        parameter = next(scorer.model.parameters())
        return {
            "qscorer_version": __version__,
            "model": {**_loaded_from(scorer.model), **(model_info or {})},
            "dtype": str(parameter.dtype).removeprefix("torch."),
            "device": str(parameter.device),
            "prompt": scorer.prompt,
            "clamp": scorer.clamp,
            "score_tokens": list(SCORE_TOKENS_REPORT_ORDER),
            "max_batch_size": batcher.max_batch_size,
            **{key: value for key, value in asdict(settings).items() if key != "api_key"},
        }

    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _loaded_from(model) -> dict:
    """The checkpoint kind, folders and quantization of a model from ``load_pretrained_model`` (else nothing)."""
    report = getattr(model, "load_report", None)
    if report is None:
        return {}
    return {"kind": report.kind, "model_folder": report.model_folder, "base_folder": report.base_folder,
            "quantization": report.quantization}


def _api_key_check(api_key: str | None):
    """A dependency that accepts ``Authorization: Bearer <api_key>`` (anything when no key is set)."""
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            reason = "wrong API key" if given else "missing API key: send 'Authorization: Bearer <key>'"
            raise RequestError(401, reason)

    return check


def _error(status: int, message: str, part: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "part": part}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return _error(error.status, str(error), error.part, headers)

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, error: QueueFullError):
        return _error(503, str(error), headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return _error(error.status_code, str(error.detail), headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        return _error(500, f"internal error: {type(error).__name__}: {error}")


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` (declared or streamed) is answered with 413.

    The rest of such a body is read and dropped first (up to ``max_bytes`` more): a server that closes the
    connection with unread data makes the client see a reset instead of the 413.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._drain(receive)
            return await _error(413, self._message(int(declared)))(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                if message.get("more_body", False):
                    await self._drain(receive)
                raise RequestError(413, self._message(received))
            return message

        await self.app(scope, limited_receive, send)

    async def _drain(self, receive) -> None:
        drained = 0
        while drained <= self.max_bytes:
            message = await receive()
            drained += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    def _message(self, size: int) -> str:
        return f"request body of {size}+ bytes; the limit is {self.max_bytes}"
