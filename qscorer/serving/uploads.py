"""Images out of a ``POST /score`` body: multipart file parts named ``images``, or JSON ``{"images": [base64]}``
(plain base64 or ``data:`` URLs).

Reading checks the structure and the sizes; :func:`decode_upload` (run in a worker thread, never on the event loop)
turns one upload into pixels through the one preprocessing path, ``qscorer.model.image_processing``. Every problem is a
:class:`RequestError` with an HTTP status and a message naming the part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
from dataclasses import dataclass

import torch

from ..errors import QScorerError
from ..model.image_processing import load_image, process_images

FIELD = "images"


class RequestError(QScorerError):
    """A request the service refuses: HTTP ``status``, a one-line message, the part it concerns (if any)."""

    def __init__(self, status: int, message: str, part: str | None = None):
        super().__init__(message)
        self.status = status
        self.part = part


@dataclass(frozen=True)
class Upload:
    """One image of a request: its name in the results, its label in errors, its bytes (or base64 text)."""

    name: str
    label: str
    data: bytes | str


def decode_upload(upload: Upload) -> torch.Tensor:
    """[3, 448, 448] pixels of one upload (float32), or a :class:`RequestError` naming it."""
    data = upload.data
    if isinstance(data, str):
        if data.startswith("data:"):
            data = data.partition(",")[2]
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, f"{upload.label} is not valid base64", upload.label) from None
    if not data:
        raise RequestError(422, f"{upload.label} is empty", upload.label)
    try:
        return process_images([load_image(io.BytesIO(data), name=upload.label)])[0]
    except QScorerError as error:
        raise RequestError(422, str(error), upload.label) from error


async def read_uploads(request, max_images: int, max_image_bytes: int) -> list[Upload]:
    """The uploads of a request (multipart or JSON), in order; at least one, at most ``max_images``."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        uploads = await _read_multipart(request, max_images, max_image_bytes)
    elif content_type == "application/json":
        uploads = await asyncio.to_thread(_parse_json, await request.body(), max_image_bytes)
    else:
        raise RequestError(
            415, f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data or application/json"
        )
    if not uploads:
        raise RequestError(400, f"no images: send one or more {FIELD!r} file parts or a JSON {FIELD!r} list")
    if len(uploads) > max_images:
        raise RequestError(400, f"{len(uploads)} images in one request; the limit is {max_images}")
    return uploads


async def _read_multipart(request, max_images: int, max_image_bytes: int) -> list[Upload]:
    uploads = []
    async with request.form(max_files=max_images, max_fields=max_images) as form:
        for field, value in form.multi_items():
            if field != FIELD:
                raise RequestError(400, f"unexpected form field {field!r}: send the images as parts named {FIELD!r}")
            label = f"{FIELD}[{len(uploads)}]"
            if isinstance(value, str):
                raise RequestError(400, f"{label} is a text field, not a file", label)
            name = value.filename or label
            label = f"{label} ({name})"
            if value.size is not None and value.size > max_image_bytes:
                raise RequestError(413, f"{label} has {value.size} bytes; the limit is {max_image_bytes}", label)
            uploads.append(Upload(name, label, await value.read()))
    return uploads


def _parse_json(body: bytes, max_image_bytes: int) -> list[Upload]:
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"malformed JSON body: {error}") from None
    images = document.get(FIELD) if isinstance(document, dict) else None
    if not isinstance(images, list):
        raise RequestError(400, f'the JSON body must be an object {{"{FIELD}": [base64 strings]}}')
    uploads = []
    for index, text in enumerate(images):
        label = f"{FIELD}[{index}]"
        if not isinstance(text, str):
            raise RequestError(400, f"{label} must be a base64 string, got {type(text).__name__}", label)
        size = len(text) * 3 // 4 - text.endswith("=") - text.endswith("==")
        if size > max_image_bytes:
            raise RequestError(413, f"{label} has {size} bytes; the limit is {max_image_bytes}", label)
        uploads.append(Upload(label, label, text))
    return uploads
