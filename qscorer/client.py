"""A small client for ``qscorer serve``, on the standard library alone (no torch, no HTTP package).

>>> from qscorer.client import Client
>>> client = Client("http://127.0.0.1:8000")
>>> client.score(["a.jpg", open("b.png", "rb").read(), pil_image])   # [3.91, 2.47, 4.12]
>>> client.results(["a.jpg"])[0]["logits"]                            # the full records of POST /score

Images are sent as they are: files and bytes unchanged, PIL images as PNG (lossless), so the service scores the
same pixels as ``Scorer`` does in-process. A full queue (503) is retried after the server's Retry-After.
"""

from __future__ import annotations

import io
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

from .errors import QScorerError


class ServiceError(QScorerError):
    """The service refused a request (``status``: the HTTP status, 0 when it could not be reached)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Client:
    """Calls a ``qscorer serve`` service at ``url`` (``api_key``: its ``--api-key``, if it has one)."""

    def __init__(
        self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 300.0,
        retries: int = 5,
    ):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries

    def score(self, images) -> list[float]:
        """Scores of one image or a list of images: paths, encoded image bytes or PIL images."""
        return [result["score"] for result in self.results(images)]

    def results(self, images) -> list[dict]:
        """The service's result per image: ``image``, ``score``, ``logits``, ``probs``, ``token_id``."""
        boundary = uuid.uuid4().hex
        body = _multipart(_named_files(images), boundary)
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        return self._request("POST", "/score", body, headers)["results"]

    def health(self) -> dict:
        return self._request("GET", "/health")

    def info(self) -> dict:
        return self._request("GET", "/info")

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> dict:
        headers = dict(headers or {})
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        attempt = 0
        while True:
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.load(response)
            except urllib.error.HTTPError as error:
                message = _error_message(error)
                if error.code != 503 or attempt == self.retries:
                    raise ServiceError(error.code, f"{method} {self.url}{path}: {error.code} {message}") from None
                attempt += 1
                time.sleep(float(error.headers.get("Retry-After") or 1))
            except urllib.error.URLError as error:
                raise ServiceError(0, f"cannot reach {self.url}: {error.reason}") from None


def _named_files(images) -> list[tuple[str, bytes]]:
    if isinstance(images, (str, os.PathLike, bytes, bytearray)) or hasattr(images, "save"):
        images = [images]
    return [_named_file(image, index) for index, image in enumerate(images)]


def _named_file(image, index: int) -> tuple[str, bytes]:
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            return path.name, path.read_bytes()
        except OSError as error:
            raise QScorerError(f"cannot read {path}: {error.strerror or error}") from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"image_{index}", bytes(image)
    if hasattr(image, "save"):
        return f"image_{index}.png", _png(image)
    raise QScorerError(f"image {index}: expected a path, bytes or a PIL image, got {type(image).__name__}")


def _png(image) -> bytes:
    """PNG bytes of a PIL image in its own mode (modes PNG cannot hold are converted to RGB, as scoring does)."""
    buffer = io.BytesIO()
    try:
        image.save(buffer, format="PNG", compress_level=1)
    except (OSError, KeyError):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _multipart(files: Sequence[tuple[str, bytes]], boundary: str) -> bytes:
    """A multipart/form-data body with one ``images`` file part per (filename, bytes)."""
    chunks = []
    for name, data in files:
        quoted = name.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")
        chunks += [
            f"--{boundary}\r\n".encode(),
            f'Content-Disposition: form-data; name="images"; filename="{quoted}"\r\n'.encode(),
            b"Content-Type: application/octet-stream\r\n\r\n",
            data,
            b"\r\n",
        ]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)


def _error_message(error: urllib.error.HTTPError) -> str:
    body = error.read()
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200] or error.reason
