"""Request bodies read and parsed defensively: a size limit enforced while reading, and JSON that cannot
hurt the parser or what comes after it. Nesting is bounded (100,000 brackets are a 400, not a
RecursionError), integers too long for Python to parse are a 400 naming their field (not the 4300-digit
ValueError), strings must be text (a lone UTF-16 surrogate such as "\\ud800" is not, and the tokenizer
would choke on it), and NaN/Infinity (not JSON) are refused. Parsing runs off the event loop."""
from __future__ import annotations

import json
import re
import sys

from starlette.requests import Request

from .serving import BadRequest

MAX_JSON_DEPTH = 64
_MAX_INT_DIGITS = sys.get_int_max_str_digits() or 4300
_SURROGATE = re.compile("[\ud800-\udfff]")
_SCALARS = frozenset({int, float, bool, type(None)})


class PayloadTooLarge(Exception):
    """A body over --max-request-bytes: HTTP 413 (and the connection closes: the rest goes unread)."""


class _HugeInt:
    """An integer literal too long to parse; the check below names where it is."""
    __slots__ = ("digits",)

    def __init__(self, digits: int):
        self.digits = digits


def _parse_int(text: str):
    return int(text) if len(text) <= _MAX_INT_DIGITS else _HugeInt(len(text))


def _no_constant(name: str):
    raise BadRequest(f"the request body is not valid JSON: {name} is not a JSON number")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing it as soon as it is known to be over `limit` bytes."""
    length = request.headers.get("content-length")
    if length is not None and (len(length) > 18 or not length.isdigit() or int(length) > limit):
        raise PayloadTooLarge(f"the request body ({length} bytes) is over the limit of {limit} bytes "
                              f"(--max-request-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes (--max-request-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(raw: bytes) -> dict:
    """raw -> a dict, or BadRequest saying what is wrong (and where)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"the request body is not UTF-8: {e}") from e
    try:
        data = json.loads(text, parse_int=_parse_int, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from e
    except RecursionError:
        raise BadRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(data).__name__}")
    _check_values(data)
    return data


def _check_values(data: dict) -> None:
    """Walk the parsed body without recursion: depth, huge integers, lone surrogates."""
    stack = [(data, "", 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels (at {path})",
                             param=path)
        if isinstance(node, dict):
            items = node.items()
            for key in node:
                _check_text(key, f"{path}.{key}" if path else key)
        else:
            if set(map(type, node)) <= _SCALARS:  # numbers only (token ids): nothing inside to look at
                continue
            items = enumerate(node)
        for key, value in items:
            where = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
            if isinstance(value, str):
                _check_text(value, where)
            elif isinstance(value, (dict, list)):
                stack.append((value, where, depth + 1))
            elif isinstance(value, _HugeInt):
                raise BadRequest(f"{where}: an integer of {value.digits} digits is out of range", param=where)


def _check_text(text: str, where: str) -> None:
    hit = _SURROGATE.search(text)
    if hit:
        raise BadRequest(f"{where}: contains a lone UTF-16 surrogate (\\u{ord(hit.group()):04x}), which is not "
                         f"text; send valid Unicode (a surrogate pair for characters beyond U+FFFF)",
                         param=where)

