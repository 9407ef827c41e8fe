"""A subset of CloudWatch Logs' filter pattern syntax, compiled to a predicate on a message.

Supported (FilterLogEvents' `filterPattern`, `aws logs tail --filter-pattern`):
  (empty) or ""              every event
  ERROR Exception            terms: every one must occur (case-sensitive substring)
  "Task timed out"           a quoted phrase is one term (`\\"` inside a quote is a quote)
  ?ERROR ?WARN               any one of the ?terms must occur (with plain terms: all of those too)
  ERROR -Retrying            a -term must not occur
  %RequestId: [0-9a-f-]+%    a regular expression (Python's `re`, searched), as a term
  { $.level = "ERROR" }      JSON: the message parses as JSON and the selector's value compares:
                             `=` / `!=` with a number, a "string" (`*` a wildcard) or true/false/null,
                             `<` `<=` `>` `>=` with a number, `IS TRUE|FALSE|NULL`, `NOT EXISTS`,
                             joined by `&&` and `||` (&& binds tighter) and grouped with ( );
                             selectors `$.a.b`, `$.a[0]`, `$.a.*` not supported
Not supported (InvalidParameterException, never a silent mismatch): space-delimited patterns
(`[ip, user, ...]`) and anything else that does not parse.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

Predicate = Callable[[str], bool]
MAX_PATTERN = 1024


class PatternError(ValueError):
    """The pattern is not in the supported subset; the message says where."""


def compile_pattern(pattern: str | None) -> Predicate | None:
    """None when every event matches, else a predicate on one event's message."""
    if pattern is None:
        return None
    if len(pattern) > MAX_PATTERN:
        raise PatternError(f"filterPattern is longer than {MAX_PATTERN} characters")
    text = pattern.strip()
    if text in ("", '""'):
        return None
    if text.startswith("{"):
        return _json_pattern(text)
    if text.startswith("["):
        raise PatternError("space-delimited filter patterns ([a, b, ...]) are not supported by ember")
    return _term_pattern(text)


# ---------------------------------------------------------------------- terms


def _terms(text: str) -> list[str]:
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        prefix = ""
        if c in "?-" and i + 1 < n and not text[i + 1].isspace():
            prefix, i = c, i + 1
            c = text[i]
        if c == '"':
            j, buf = i + 1, []
            while j < n and text[j] != '"':
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(text[j])
                j += 1
            if j >= n:
                raise PatternError(f"unterminated quote at position {i}")
            out.append(prefix + '"' + "".join(buf))  # a leading '"' marks a literal
            i = j + 1
        elif c == "%":
            j = text.find("%", i + 1)
            if j < 0:
                raise PatternError(f"unterminated regular expression at position {i}")
            out.append(prefix + "%" + text[i + 1 : j])
            i = j + 1
        else:
            j = i
            while j < n and not text[j].isspace():
                j += 1
            out.append(prefix + '"' + text[i:j])
            i = j
    return out


def _regex(rx: re.Pattern[str]) -> Predicate:
    return lambda message: rx.search(message) is not None


def _literal(text: str) -> Predicate:
    return lambda message: text in message


def _term_pattern(text: str) -> Predicate:
    need: list[Predicate] = []
    any_of: list[Predicate] = []
    none_of: list[Predicate] = []
    for term in _terms(text):
        kind = {"?": any_of, "-": none_of}.get(term[0], need)
        if kind is not need:
            term = term[1:]
        if term.startswith("%"):
            try:
                rx = re.compile(term[1:])
            except re.error as exc:
                raise PatternError(f"invalid regular expression {term[1:]!r}: {exc}") from None
            kind.append(_regex(rx))
        else:
            kind.append(_literal(term[1:]))

    def match(message: str) -> bool:
        return (
            all(p(message) for p in need)
            and (not any_of or any(p(message) for p in any_of))
            and not any(p(message) for p in none_of)
        )

    return match


# ---------------------------------------------------------------------- JSON

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<sel>\$(?:\.[A-Za-z0-9_@\-]+|\[\d+\])*)
    | (?P<op>&&|\|\||!=|<=|>=|=|<|>|\(|\))
    | (?P<str>"(?:[^"\\]|\\.)*")
    | (?P<num>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![A-Za-z0-9_*.\-]))
    | (?P<word>[^\s()&|=!<>"]+)
    )""",
    re.VERBOSE,
)
_MISSING = object()


def _tokens(body: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    body = body.rstrip()
    while pos < len(body):
        m = _TOKEN.match(body, pos)
        if m is None or m.end() == pos:
            raise PatternError(f"cannot parse the JSON filter pattern at {body[pos:pos + 20]!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _select(doc: Any, selector: str) -> Any:
    for part in re.findall(r"\.([^.\[]+)|\[(\d+)\]", selector[1:]):
        key, index = part
        if key:
            if not isinstance(doc, dict) or key not in doc:
                return _MISSING
            doc = doc[key]
        else:
            i = int(index)
            if not isinstance(doc, list) or i >= len(doc):
                return _MISSING
            doc = doc[i]
    return doc


def _wildcard(text: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if c == "*" else re.escape(c) for c in text), re.DOTALL)


def _condition(selector: str, op: str, kind: str, raw: str) -> Callable[[Any], bool]:
    if kind == "num":
        number = float(raw)

        def numeric(doc: Any) -> bool:
            v = _select(doc, selector)
            if isinstance(v, bool) or not isinstance(v, int | float):
                return False
            return {
                "=": v == number, "!=": v != number, "<": v < number,
                "<=": v <= number, ">": v > number, ">=": v >= number,
            }[op]  # fmt: skip

        return numeric
    if op not in ("=", "!="):
        raise PatternError(f"{op} compares numbers only, not {raw!r}")
    if kind == "word" and raw.lower() in ("true", "false", "null"):
        const = {"true": True, "false": False, "null": None}[raw.lower()]

        def constant(doc: Any) -> bool:
            v = _select(doc, selector)
            return v is not _MISSING and (v is const) == (op == "=")

        return constant
    text = orjson.loads(raw) if kind == "str" else raw
    rx = _wildcard(text)

    def string(doc: Any) -> bool:
        v = _select(doc, selector)
        if not isinstance(v, str):
            return op == "!=" and v is not _MISSING
        return (rx.fullmatch(v) is not None) == (op == "=")

    return string


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.i = 0

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.i] if self.i < len(self.tokens) else ("end", "")

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        self.i += 1
        return tok

    def expr(self) -> Callable[[Any], bool]:
        parts = [self.conj()]
        while self.peek() == ("op", "||"):
            self.take()
            parts.append(self.conj())
        return parts[0] if len(parts) == 1 else (lambda d: any(p(d) for p in parts))

    def conj(self) -> Callable[[Any], bool]:
        parts = [self.atom()]
        while self.peek() == ("op", "&&"):
            self.take()
            parts.append(self.atom())
        return parts[0] if len(parts) == 1 else (lambda d: all(p(d) for p in parts))

    def atom(self) -> Callable[[Any], bool]:
        kind, value = self.take()
        if (kind, value) == ("op", "("):
            inner = self.expr()
            if self.take() != ("op", ")"):
                raise PatternError("missing ) in the JSON filter pattern")
            return inner
        if kind != "sel":
            raise PatternError(f"expected a selector such as $.field, got {value!r}")
        selector = value
        kind, value = self.take()
        if kind == "word" and value.upper() == "IS":
            _, what = self.take()
            consts = {"TRUE": True, "FALSE": False, "NULL": None}
            if what.upper() not in consts:
                raise PatternError(f"IS takes TRUE, FALSE or NULL, not {what!r}")
            const = consts[what.upper()]
            return lambda d: _select(d, selector) is const
        if kind == "word" and value.upper() == "NOT":
            _, what = self.take()
            if what.upper() != "EXISTS":
                raise PatternError(f"expected NOT EXISTS, got NOT {what!r}")
            return lambda d: _select(d, selector) is _MISSING
        if kind != "op" or value not in ("=", "!=", "<", "<=", ">", ">="):
            raise PatternError(f"expected a comparison after {selector}, got {value!r}")
        vkind, raw = self.take()
        if vkind not in ("num", "str", "word"):
            raise PatternError(f"expected a value after {selector} {value}, got {raw!r}")
        return _condition(selector, value, vkind, raw)


def _json_pattern(text: str) -> Predicate:
    if not text.endswith("}"):
        raise PatternError("a JSON filter pattern must end with }")
    parser = _Parser(_tokens(text[1:-1]))
    if parser.peek()[0] == "end":
        raise PatternError("empty JSON filter pattern")
    cond = parser.expr()
    if parser.peek()[0] != "end":
        raise PatternError(f"unexpected {parser.peek()[1]!r} in the JSON filter pattern")

    def match(message: str) -> bool:
        if not message.lstrip().startswith(("{", "[")):
            return False
        try:
            doc = orjson.loads(message)
        except orjson.JSONDecodeError:
            return False
        return cond(doc)

    return match
