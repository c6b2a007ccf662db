"""Time filters: an RFC 3339 instant or interval (`2021-06-01T00:00:00Z`, `2021-01-01/2021-12-31`,
open ends `../2021-06-01`, `2021-06-01/..`) applied to items that carry a time.

Items indexed from a STAC catalog carry `time_start` and `time_end` (seconds since 1970 UTC: the
Item's `datetime` twice, or its `start_datetime`/`end_datetime`). An item matches when its span
meets the interval, ends included, as the STAC API defines it. The filter is a `where`
expression over those two fields, joined to the user's own with `and`: it is resolved to the
allowed keys like every filter, so searches stay exact top-k among the matching items, on every
engine and on sharded indexes alike. Timestamps are read by stac-fastapi's RFC 3339 parser;
a bare date (2021-06-01) stands for that whole UTC day.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from rshash.errors import RshashError

TIME_FIELDS = ("time_start", "time_end")
MAX_DATETIME_CHARS = 100  # two RFC 3339 timestamps with a slash fit in 80


def _parse(text: str) -> datetime:
    from stac_fastapi.types.rfc3339 import rfc3339_str_to_datetime

    try:
        return rfc3339_str_to_datetime(text)
    except Exception:  # iso8601.ParseError and ValueError
        raise RshashError(
            f"datetime: expected an RFC 3339 timestamp like 2021-06-01T00:00:00Z, got {text!r}"
        ) from None


def parse_datetime(text: str) -> tuple[float | None, float | None]:
    """`text` → (start, end) in seconds since 1970 UTC; None for an open end. A bare date
    (2021-06-01) counts as that whole UTC day."""
    if len(text) > MAX_DATETIME_CHARS:
        raise RshashError(f"datetime: longer than {MAX_DATETIME_CHARS} characters")
    parts = text.strip().split("/")
    if len(parts) > 2 or not text.strip():
        raise RshashError(
            f"datetime: expected an instant or START/END (open end: ..), got {text!r}"
        )
    if len(parts) == 1:
        start, end = _bound(parts[0], False), _bound(parts[0], True)
        if start is None:
            raise RshashError("datetime: '..' alone is no time; give START/.. or ../END")
        return start, end
    start, end = _bound(parts[0], False), _bound(parts[1], True)
    if start is None and end is None:
        raise RshashError("datetime: both ends open ('../..'); leave --datetime out instead")
    if start is not None and end is not None and start > end:
        raise RshashError(f"datetime: start after end in {text!r}")
    return start, end


def _bound(text: str, end: bool) -> float | None:
    """One end of an interval: None when open; a bare date spans its whole day."""
    text = text.strip()
    if text in ("", ".."):
        return None
    if len(text) == 10 and text[4] == "-" and text[7] == "-":  # a date: its first or last second
        day = _parse(f"{text}T00:00:00Z").timestamp()
        return day + 86400 - 1e-6 if end else day
    return _parse(text).timestamp()


def time_where(text: str, fields: Collection[str] | None = None) -> str:
    """The `where` expression of a time filter. `fields`: the index's record fields, to refuse
    a time filter on an index whose items carry no time (instead of matching nothing)."""
    start, end = parse_datetime(text)
    if fields is not None and not set(TIME_FIELDS) <= set(fields):
        raise RshashError(
            "datetime: this index's items carry no time (index a STAC catalog to filter by time)"
        )
    parts = []
    if start is not None:
        parts.append(f"time_end >= {start!r}")
    if end is not None:
        parts.append(f"time_start <= {end!r}")
    return " and ".join(parts)


def with_datetime(
    where: str | None, datetime_text: str | None, fields: Collection[str] | None = None
) -> str | None:
    """`where` and the time filter `datetime_text` as one `where` expression (either may be
    None)."""
    if datetime_text is None:
        return where
    clause = time_where(datetime_text, fields)
    return clause if where is None else f"({where}) and {clause}"
