"""The `where=` filter language, compiled to parameterised SQL over the item records.

Grammar (keywords are case-insensitive)::

    expr    := term ("or" term)*
    term    := factor ("and" factor)*
    factor  := "not" factor | "(" expr ")" | compare
    compare := FIELD ("=" | "==" | "!=" | "<" | "<=" | ">" | ">=") VALUE
             | FIELD ["not"] "in" "(" VALUE ("," VALUE)* ")"
    VALUE   := "string" | 'string' | number | true | false | null
    FIELD   := name ("." name)*        (name: letters, digits, _ and -, not starting with a digit)

`id`, `image`, `path`, `class` and `dataset` are columns (the last two indexed); any other field is
looked up in the record (`year`, `window.row`). `= null` / `!= null` test for a missing value.
Values are bound as SQL parameters and field names are checked against the grammar, so no user
text ever becomes SQL. Examples: `class = "parking" and year >= 2010`,
`dataset in ("ucm", "rsscn7")`, `not (class = "river" or cloud > 0.2)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from rshash.data import bbox as boxes
from rshash.errors import RshashError

COLUMNS = ("id", "image", "path", "class", "dataset")
_TOKEN = re.compile(
    r"""\s*(?:
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<number>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
  | (?P<op>==|!=|<=|>=|=|<|>|\(|\)|,)
  | (?P<name>[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z_][A-Za-z0-9_\-]*)*)
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


def tokenize(text: str) -> list[Token]:
    tokens, at = [], 0
    while at < len(text):
        if text[at:].strip() == "":
            break
        m = _TOKEN.match(text, at)
        if m is None or m.end() == at:
            raise RshashError(f"where: unexpected {text[at:].strip()[:20]!r} at {at}")
        kind = m.lastgroup or "op"
        word, start = m.group(kind), m.start(kind)
        if kind == "name" and word.lower() in _KEYWORDS:
            kind, word = "keyword", word.lower()
        tokens.append(Token(kind, word, start))
        at = m.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.pos = 0
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

    def factor(self) -> str:
        if self.accept("keyword", "not"):
            return f"(NOT COALESCE({self.factor()}, 0))"
        if self.accept("op", "("):
            inner = self.expr()
            self.take("op", ")")
            return inner
        return self.compare()

    def value(self) -> Any:
        tok = self.peek()
        self.pos += 1
        if tok.kind == "string":
            return re.sub(r"\\(.)", r"\1", tok.text[1:-1])
        if tok.kind == "number":
            return float(tok.text) if any(c in tok.text for c in ".eE") else int(tok.text)
        if tok.kind == "keyword" and tok.text in ("true", "false", "null"):
            return {"true": 1, "false": 0, "null": None}[tok.text]
        raise RshashError(f"where: expected a value at {tok.at}, got {tok.text or 'end'!r}")

    def compare(self) -> str:
        field = self.take("name").text
        column = _column(field)
        negate = self.accept("keyword", "not")
        if negate or (self.peek().kind, self.peek().text) == ("keyword", "in"):
            self.take("keyword", "in")
            self.take("op", "(")
            values = [self.value()]
            while self.accept("op", ","):
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


def compile_where(text: str) -> tuple[str, list[Any]]:
    """A filter expression → (SQL condition over `items`, its parameters)."""
    parser = _Parser(text)
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
    except (TypeError, ValueError):
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
