"""Small helpers shared by the store's repositories."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any

from tether.store.engine import StoreError

MAX_NAME_LEN = 200


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones in the session zone."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def check_name(value: object, what: str, *, max_len: int = MAX_NAME_LEN, allow_at: bool = True) -> str:
    """A short printable identifier (source key, model name, run name)."""
    if not isinstance(value, str) or not value.strip():
        raise StoreError(f"The {what} must be a non-empty string; got {value!r}.")
    if len(value) > max_len:
        raise StoreError(f"The {what} {value[:40]!r}... is {len(value)} characters; use at most {max_len}.")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise StoreError(f"The {what} {value!r} contains control characters; use printable text.")
    if not allow_at and "@" in value:
        raise StoreError(f"The {what} {value!r} contains '@', which separates NAME@VERSION; remove it.")
    return value


def to_json_text(value: Any, what: str) -> str:
    """Strict JSON (no NaN/inf, only JSON types) so any program can parse what we store."""
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"), default=_reject)
    except (TypeError, ValueError) as exc:
        raise StoreError(
            f"The {what} is not plain JSON ({exc}); pass numbers, strings, lists and dicts."
        ) from None


def check_json(value: Any, what: str) -> Any:
    """Validate and return a JSON-able value (round-tripped, so numpy scalars become plain numbers)."""
    if value is None:
        return None
    return json.loads(to_json_text(value, what))


def _reject(obj: Any) -> Any:
    # numpy scalars and arrays are common in metrics dicts; accept them as their Python values.
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON")


def metric_value(value: Any) -> float | None:
    """A metric as a float; NaN is stored as NULL (SQLite cannot store NaN)."""
    number = float(value)
    return None if math.isnan(number) else number
