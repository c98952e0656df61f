"""Reading record files: a JSON list, or JSON lines (one object per non-empty line). Metas, predictions and
ground-truth files all come in both forms, whatever their suffix, so the content decides. No torch here."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..errors import QScorerError


def read_json_records(path: str | os.PathLike) -> list:
    """The records of ``path``; errors name the file (and the line, for JSON lines)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise QScorerError(f"cannot read {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise QScorerError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise QScorerError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(records, list):
            raise QScorerError(f"{path} must hold a JSON list of records")
        return records
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise QScorerError(
                    f"{path} line {number}: not valid JSON ({error.msg}); expected a JSON list or one JSON object "
                    "per line"
                ) from None
    return records


def finite_number(value) -> float | None:
    """``value`` (a JSON number or a numeric string, not a bool) as a finite float, else None (NaN, Infinity,
    which Python's json module reads, and anything else)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None
