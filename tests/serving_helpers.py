"""Helpers for the service tests: the serve extra, a tiny checkpoint, distinct test images, raw HTTP calls, a PNG
decompression bomb."""

from __future__ import annotations

import importlib
import json
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import save_tiny_checkpoint

from qscorer.client import _multipart
from qscorer.errors import QScorerError


def serving_or_skip():
    """``qscorer.serving``, or skip the calling test module with the install hint when the serve extra is missing."""
    try:
        return importlib.import_module("qscorer.serving")
    except QScorerError as missing:
        pytest.skip(str(missing), allow_module_level=True)


def service_checkpoint(folder: Path, seed: int) -> Path:
    """A tiny checkpoint initialised at width^-0.5: at the default 0.02 a width-64 model gives nearly the same score
    to every image, and the service tests must tell the images' results apart."""
    return save_tiny_checkpoint(folder, seed=seed, initializer_range=0.125)


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` distinct small images of varied sizes, modes and formats (noise over a gradient)."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        width, height = int(rng.integers(40, 160)), int(rng.integers(40, 160))
        gradient = np.linspace(0, 255, width)[None, :, None] * rng.random(3)
        pixels = np.clip(gradient + rng.normal(0, 60, (height, width, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        kind = index % 4
        if kind == 1:
            image = image.convert("L")
        elif kind == 2:
            image = image.convert("P", palette=Image.ADAPTIVE)
        suffix = ".jpg" if kind == 3 else ".png"
        path = folder / f"image_{index:02d}{suffix}"
        image.save(path)
        paths.append(path)
    return paths


def post(url: str, body: bytes, content_type: str | None, headers: dict | None = None):
    """(status, JSON body, headers) of a POST, whatever the status."""
    headers = dict(headers or {})
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


def post_files(url: str, files: list[tuple[str, bytes]], headers: dict | None = None):
    """POST ``files`` as multipart ``images`` parts."""
    return post(url, _multipart(files, "qscorer-test-boundary"), "multipart/form-data; boundary=qscorer-test-boundary",
                headers)


def get(url: str, headers: dict | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def png_bomb(side: int = 20000) -> bytes:
    """A tiny PNG whose header claims ``side`` x ``side`` 1-bit pixels (far over PIL's decompression-bomb limit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + side // 8) * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
