"""The `where=` filter language, compiled to parameterised SQL over the item records.

Grammar (keywords are case-insensitive)::

    expr    := term ("or" term)*
    term    := factor ("and" factor)*
    factor  := "not" factor | "(" expr ")" | compare
    compare := FIELD ("=" | "==" | "!=" | "<" | "<=" | ">" | ">=") VALUE
             | FIELD ["not"] "in" "(" VALUE ("," VALUE)* ")"
    VALUE   := "string" | 'string' | number | true | false | null
    FIELD   := name ("." name)*        (name: letters, digits, _ - :, not starting with a digit)

`id`, `image`, `path`, `class` and `dataset` are columns (the last two indexed); any other field is
looked up in the record (`year`, `window.row`). `= null` / `!= null` test for a missing value.
Values are bound as SQL parameters and field names are checked against the grammar, so no user
text ever becomes SQL. Examples: `class = "parking" and year >= 2010`,
`dataset in ("ucm", "rsscn7")`, `not (class = "river" or cloud > 0.2)`, `eo:cloud_cover < 10`
(STAC property names keep their prefix).

Any text is safe to hand in: it is scanned once (linear time), the limits below bound its size,
nesting, lists and numbers, a field the index does not hold is an error that lists those it
does, and every failure is a one-line `RshashError` naming what was expected.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from rshash.data import bbox as boxes
from rshash.errors import RshashError

COLUMNS = ("id", "image", "path", "class", "dataset")
# Limits, each named in the error that enforces it: a filter's cost stays small and bounded
# (compiled in linear time, an SQL expression SQLite accepts), whatever the text.
MAX_CHARS = 4096  # characters of a filter
MAX_TOKENS = 1024  # tokens of a filter (each a comparison, value, operator or parenthesis)
MAX_DEPTH = 24  # parentheses and `not`s open at once (SQLite's parser stack holds 100)
MAX_IN_VALUES = 256  # values of one `in (...)` list
MAX_NUMBER_CHARS = 64  # characters of a number literal, checked before it is converted
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # SQLite's integers: signed 64-bit

_SPACE = re.compile(r"\s*")
_TOKEN = re.compile(
    r"""(?:
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<number>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
  | (?P<op>==|!=|<=|>=|=|<|>|\(|\)|,)
  | (?P<name>[A-Za-z_][A-Za-z0-9_\-:]*(?:\.[A-Za-z_][A-Za-z0-9_\-:]*)*)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "true", "false", "null"}
_COMPARE = {"=": "=", "==": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


@dataclass(frozen=True)
class Token:
    kind: str  # string, number, op, name, keyword, end
    text: str
    at: int


def check_text(text: str, what: str = "where") -> str:
    """`text` if it is valid Unicode text (encodes as UTF-8: no lone surrogates), else a
    one-line error naming `what` (SQLite and the JSON answers would fail on it later)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RshashError(
            f"{what}: not valid UTF-8 text (lone surrogate at character {exc.start})"
        ) from None
    return text


def tokenize(text: str) -> list[Token]:
    """The filter's tokens, in one left-to-right scan (linear in its length), then `end`."""
    if len(text) > MAX_CHARS:
        raise RshashError(f"where: longer than {MAX_CHARS} characters ({len(text)})")
    check_text(text)
    tokens: list[Token] = []
    at = _SPACE.match(text).end()  # type: ignore[union-attr]
    while at < len(text):
        m = _TOKEN.match(text, at)
        if m is None:
            raise RshashError(f"where: unexpected {text[at : at + 20]!r} at {at}")
        if len(tokens) == MAX_TOKENS:
            raise RshashError(f"where: more than {MAX_TOKENS} tokens")
        kind = m.lastgroup or "op"
        word = m.group(kind)
        if kind == "name" and word.lower() in _KEYWORDS:
            kind, word = "keyword", word.lower()
        tokens.append(Token(kind, word, at))
        at = _SPACE.match(text, m.end()).end()  # type: ignore[union-attr]
    tokens.append(Token("end", "", len(text)))
    return tokens


def _number(tok: Token) -> int | float:
    """A number literal's value: an integer in SQLite's range, or a finite float."""
    if len(tok.text) > MAX_NUMBER_CHARS:
        raise RshashError(f"where: number at {tok.at} longer than {MAX_NUMBER_CHARS} characters")
    if any(c in tok.text for c in ".eE"):
        value = float(tok.text)
        if not math.isfinite(value):
            raise RshashError(f"where: number {tok.text} at {tok.at} is not finite")
        return value
    number = int(tok.text)
    if not INT_MIN <= number <= INT_MAX:
        raise RshashError(
            f"where: integer {tok.text} at {tok.at} does not fit 64 bits (SQLite's integers)"
        )
    return number


class _Parser:
    def __init__(self, text: str, fields: Collection[str] | None) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.fields = fields
        self.pos = 0
        self.depth = 0
        self.params: list[Any] = []

    def peek(self) -> Token:
        return self.tokens[self.pos]

    def take(self, kind: str, text: str | None = None) -> Token:
        tok = self.peek()
        if tok.kind != kind or (text is not None and tok.text != text):
            want = text or kind
            got = tok.text or "end of filter"
            raise RshashError(f"where: expected {want} at {tok.at}, got {got!r}")
        self.pos += 1
        return tok

    def accept(self, kind: str, text: str) -> bool:
        tok = self.peek()
        if tok.kind == kind and tok.text == text:
            self.pos += 1
            return True
        return False

    def expr(self) -> str:
        parts = [self.term()]
        while self.accept("keyword", "or"):
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"

    def term(self) -> str:
        parts = [self.factor()]
        while self.accept("keyword", "and"):
            parts.append(self.factor())
        return parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"

    def nested(self, at: int) -> None:
        """One more level of parentheses or `not` (the parser recurses once per level)."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise RshashError(f"where: nested deeper than {MAX_DEPTH} levels at {at}")

    def factor(self) -> str:
        at = self.peek().at
        if self.accept("keyword", "not"):
            self.nested(at)
            inner = self.factor()
            self.depth -= 1
            return f"({inner} IS NOT 1)"  # NULL (no value) counts as false, as NOT NULL would not
        if self.accept("op", "("):
            self.nested(at)
            inner = self.expr()
            self.take("op", ")")
            self.depth -= 1
            return inner
        return self.compare()

    def value(self) -> Any:
        tok = self.peek()
        self.pos += 1
        if tok.kind == "string":
            return re.sub(r"\\(.)", r"\1", tok.text[1:-1])
        if tok.kind == "number":
            return _number(tok)
        if tok.kind == "keyword" and tok.text in ("true", "false", "null"):
            return {"true": 1, "false": 0, "null": None}[tok.text]
        raise RshashError(f"where: expected a value at {tok.at}, got {tok.text or 'end'!r}")

    def field(self) -> str:
        tok = self.take("name")
        top = tok.text.split(".", 1)[0]
        if self.fields is not None and top not in self.fields:
            have = ", ".join(sorted(self.fields)) or "no fields"
            raise RshashError(f"where: unknown field {top!r} at {tok.at}; this index has: {have}")
        return tok.text

    def compare(self) -> str:
        field = self.field()
        column = _column(field)
        negate = self.accept("keyword", "not")
        if negate or (self.peek().kind, self.peek().text) == ("keyword", "in"):
            self.take("keyword", "in")
            start = self.take("op", "(")
            values = [self.value()]
            while self.accept("op", ","):
                if len(values) == MAX_IN_VALUES:
                    raise RshashError(
                        f"where: more than {MAX_IN_VALUES} values in the list at {start.at}"
                    )
                values.append(self.value())
            self.take("op", ")")
            self.params.extend(values)
            marks = ", ".join("?" * len(values))
            return f"({column} {'NOT IN' if negate else 'IN'} ({marks}))"
        op = self.take("op").text
        if op not in _COMPARE:
            raise RshashError(f"where: expected a comparison after {field!r}, got {op!r}")
        value = self.value()
        if value is None:
            if op not in ("=", "==", "!="):
                raise RshashError(f"where: {field} {op} null: null only compares with = or !=")
            return f"({column} IS {'NOT ' if op == '!=' else ''}NULL)"
        self.params.append(value)
        return f"({column} {_COMPARE[op]} ?)"


def _column(field: str) -> str:
    if field in COLUMNS:
        return f'"{field}"'
    path = "".join(f'."{part}"' for part in field.split("."))
    return f"json_extract(record, '${path}')"


def compile_where(text: str, fields: Collection[str] | None = None) -> tuple[str, list[Any]]:
    """A filter expression → (SQL condition over `items`, its parameters).

    `fields`: the record fields the index holds; a filter naming another (by its first part:
    `window` for `window.row`) is an error listing them, not a filter that silently matches
    nothing. Every limit above is checked; any bad input is a one-line `RshashError`.
    """
    parser = _Parser(text, fields)
    if parser.peek().kind == "end":
        raise RshashError("where: empty filter")
    sql = parser.expr()
    parser.take("end")
    return sql, parser.params


def check_bbox(bbox: Any) -> boxes.BBox:
    """(minlon, minlat, maxlon, maxlat) in WGS84 degrees, checked (one rule for every entry);
    minlon > maxlon crosses the antimeridian."""
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError, OverflowError):
        raise RshashError(
            f"bbox: expected 4 numbers (minlon, minlat, maxlon, maxlat), got {bbox!r}"
        ) from None
    return boxes.check_bbox(values)


_BOUND = [f"json_extract(record, '$.bounds_wgs84[{i}]')" for i in range(4)]
_EAST = f"(CASE WHEN {_BOUND[2]} < {_BOUND[0]} THEN {_BOUND[2]} + 360 ELSE {_BOUND[2]} END)"


def compile_bbox(bbox: boxes.BBox) -> tuple[str, list[Any]]:
    """A checked box → (SQL condition over `items`, its parameters): the item's `bounds_wgs84`
    meets the box, either or both crossing the antimeridian.

    The R*Tree `bounds` holds each box's span on the unwrapped line (`bbox.lon_span`) and is
    queried at each shift of the query (`bbox.query_spans`); its 32-bit corners are rounded
    outwards, so the record's own bounds then decide exactly.
    """
    west, south, east, north = bbox
    spans = boxes.query_spans(west, east)
    tree = " UNION ALL ".join(
        "SELECT rid FROM bounds WHERE maxlon >= ? AND minlon <= ? AND maxlat >= ? AND minlat <= ?"
        for _ in spans
    )
    exact = " OR ".join(f"({_EAST} >= ? AND {_BOUND[0]} <= ?)" for _ in spans)
    sql = f"rid IN ({tree}) AND {_BOUND[3]} >= ? AND {_BOUND[1]} <= ? AND ({exact})"
    params: list[Any] = [v for lo, hi in spans for v in (lo, hi, south, north)]
    params += [south, north, *(v for span in spans for v in span)]
    return sql, params
