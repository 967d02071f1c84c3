"""MiniMax-M1's tool calls -> OpenAI `tool_calls`, whole or streamed.

The format (MiniMax-M1's function-call guide; the released chat template asks the model for it):

    <think>...</think>                                       optional (the reasoning parser's part)
    Let me look that up.                                     -> content
    <tool_calls>
    {"name": "get_weather", "arguments": {"city": "Paris"}}  -> tool_calls[0]
    {"name": "get_time", "arguments": {}}                    -> tool_calls[1]
    </tool_calls>

One state machine serves streaming and whole outputs (as the reasoning parser does), so both give the same
result by construction. Its rules:
- A call is a JSON object inside <tool_calls>...</tool_calls>. The format puts one per line; objects are scanned
  (strings and nesting tracked), not lines, so a pretty-printed object or two on one line parse too.
- content is the text outside the blocks; whitespace that only separates it from a block is dropped.
- A tag inside <think>...</think> is not a call. The reasoning parser normally removes that block before this
  parser sees the text; when reasoning is not split off, this parser passes the block through as content.
- Streaming (OpenAI's shape): a call's first delta carries index, id, type and name (arguments "") as soon as
  the name has been read; when "arguments" follows "name" (the format's order) its JSON text then streams as it
  arrives, exactly as the model wrote it. A call whose keys come in another order goes out whole when its
  object closes, arguments re-serialised.
- Malformed input is skipped, the good calls around it kept: an object that is not {"name": string, ...} (and
  has not already sent its name), or stray text between objects (up to the end of its line). A block that
  yields no call at all is given back as content, verbatim, so nothing the model wrote is lost.
- As OpenAI warns, arguments are the model's text: a call whose name has gone out keeps whatever arguments
  followed, even when they are not valid JSON (an output cut off by max_tokens in the middle of a call). A
  call with no arguments gets "{}".
"""
from __future__ import annotations

import json
import re
import secrets

from .reasoning import _partial_tag

START, END = "<tool_calls>", "</tool_calls>"
THINK_START, THINK_END = "<think>", "</think>"

_STRING = r'"(?:[^"\\]|\\.)*"'
_NAME = re.compile(r'\{\s*"name"\s*:\s*(' + _STRING + r')\s*[,}]$')  # checked when a ',' or '}' closes the name
_ARGS = re.compile(r'\{\s*"name"\s*:\s*' + _STRING + r'\s*,\s*"arguments"\s*:\s*$')  # checked at a value start
_VALUE_START = set('{["-0123456789tfn')  # what a JSON value can start with


def _json_string(text: str) -> str | None:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


class ToolCallParser:
    """Feed the cumulative answer text; get back (content delta, tool-call deltas) since the last call.
    Text that may be the start of a tag, and trailing whitespace that may only separate content from a
    block, are held back until the next call shows what they are (or final=True)."""

    def __init__(self, in_think: bool = False):
        self._mode = "think" if in_think else "text"  # text | think | block
        self._seen = 0  # characters of the text consumed so far
        self._strip = False  # drop whitespace right after a block of calls
        self.calls: list[dict] = []  # the calls so far, OpenAI-shaped (arguments complete once final)
        self._block_start = 0
        self._block_calls = 0
        self._gap = ""  # whitespace dropped before the current block (given back if the block has no call)
        self._between = "space"  # in a block, outside objects: space | skip (a bad line)
        self._obj: _Object | None = None

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        content, deltas = [], []
        while self._seen < len(text):
            before = (self._mode, self._seen)
            if self._mode == "think":
                self._think(text, final, content)
            elif self._mode == "text":
                self._text(text, final, content)
            else:
                self._block(text, final, content, deltas)
            if (self._mode, self._seen) == before:
                break  # waiting for more text
        if final:
            if self._mode == "block":
                self._end_block(text, len(text), content, deltas)
            elif self._gap:
                content.append(self._gap)
                self._gap = ""
        return "".join(content), _merge(deltas)

    # ---- outside blocks -----------------------------------------------------------------------------

    def _think(self, text, final, content):
        new = text[self._seen:]
        end = new.find(THINK_END)
        if end >= 0:
            content.append(new[:end + len(THINK_END)])
            self._seen += end + len(THINK_END)
            self._mode = "text"
            return
        keep = 0 if final else _partial_tag(new, THINK_END)
        content.append(new[:len(new) - keep])
        self._seen += len(new) - keep

    def _text(self, text, final, content):
        new = text[self._seen:]
        if self._strip:
            stripped = new.lstrip()
            self._seen += len(new) - len(stripped)
            new = stripped
            if not new:
                return
            self._strip = False
        call, think = new.find(START), new.find(THINK_START)
        if think >= 0 and (call < 0 or think < call):
            content.append(self._gap + new[:think + len(THINK_START)])
            self._gap = ""
            self._seen += think + len(THINK_START)
            self._mode = "think"
        elif call >= 0:
            head = new[:call]
            body = head.rstrip()
            content.append(self._gap + body if body else "")
            self._gap = "" if body else self._gap
            self._gap += head[len(body):]
            self._block_start = self._seen + call
            self._seen += call + len(START)
            self._mode, self._block_calls, self._between = "block", 0, "space"
        else:
            keep = 0 if final else max(_partial_tag(new, START), _partial_tag(new, THINK_START))
            ready = new[:len(new) - keep]
            body = ready if final else ready.rstrip()
            if body:
                content.append(self._gap + body)
                self._gap = ""
            self._gap += ready[len(body):]
            self._seen += len(ready)

    # ---- inside a block -----------------------------------------------------------------------------

    def _block(self, text, final, content, deltas):
        i = self._seen
        while i < len(text):
            ch = text[i]
            at_tag = ch == "<" and (self._obj is None or not self._obj.in_string)
            if at_tag:
                rest = text[i:i + len(END)]
                if rest == END:
                    self._end_block(text, i, content, deltas)
                    self._seen = i + len(END)
                    return
                if not final and END.startswith(rest):
                    break  # maybe the end tag: wait
            if self._obj is not None:
                self._obj.add(ch, self, deltas)
                if self._obj.closed:
                    self._obj = None
            elif self._between == "skip":
                self._between = "space" if ch == "\n" else "skip"
            elif ch == "{":
                self._obj = _Object()
                self._obj.add(ch, self, deltas)
            elif not ch.isspace():
                self._between = "skip"  # stray text: skip the rest of the line
            i += 1
        self._seen = i

    def _end_block(self, text, end, content, deltas):
        """The block ends at text[end] (its end tag, or the end of the output)."""
        if self._obj is not None:
            self._obj.finish(self, deltas)
            self._obj = None
        if self._block_calls == 0:  # nothing usable: give the block back as content
            content.append(self._gap + text[self._block_start:end + (len(END) if text.startswith(END, end) else 0)])
            self._strip = False
        else:
            self._strip = True
        self._gap = ""
        self._mode = "text"

    def _emit_header(self, name: str, deltas):
        call = {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": ""}}
        self.calls.append(call)
        self._block_calls += 1
        deltas.append({"index": len(self.calls) - 1, **call, "function": {"name": name, "arguments": ""}})

    def _emit_arguments(self, piece: str, deltas):
        if piece:
            self.calls[-1]["function"]["arguments"] += piece
            deltas.append({"index": len(self.calls) - 1, "function": {"arguments": piece}})


class _Object:
    """One JSON object inside a block, scanned a character at a time: strings and nesting tracked, the name
    read when the value after "name" ends, the value after "arguments" streamed (objects and arrays) or
    buffered (strings and other scalars) as it arrives."""

    def __init__(self):
        self.buf = ""
        self.depth = 0
        self.in_string = self.escape = False
        self.closed = False
        self.header = False  # the call's first delta has gone out
        self.args_kind = None  # None (not reached) | "raw" (object/array) | "string" | "scalar"
        self.args_buf = ""
        self.args_done = False

    def add(self, ch: str, parser: ToolCallParser, deltas: list) -> None:
        top = self.depth == 1 and not self.in_string  # ch sits at the object's own level
        prev, was_string = self.buf, self.in_string
        self.buf += ch
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
        if top and not self.header and ch in ",}":
            name = _json_string(m.group(1)) if (m := _NAME.match(self.buf)) else None
            if name:
                self.header = True
                parser._emit_header(name, deltas)
        if top and self.header and self.args_kind is None and ch in _VALUE_START and _ARGS.match(prev):
            self.args_kind = "raw" if ch in "{[" else "string" if ch == '"' else "scalar"
        if self.args_kind is not None and not self.args_done:
            if self.args_kind == "scalar" and top and ch in ",}":
                self._finish_args(parser, deltas)  # the scalar ended before this character
            else:
                self.args_buf += ch
                if self.args_kind == "raw":
                    parser._emit_arguments(ch, deltas)
                    self.args_done = self.depth == 1 and not self.in_string
                elif self.args_kind == "string" and was_string and not self.in_string:
                    self._finish_args(parser, deltas)
        if self.depth == 0:
            self.finish(parser, deltas)

    def _finish_args(self, parser: ToolCallParser, deltas: list) -> None:
        raw = self.args_buf.strip()
        if self.args_kind == "string":  # arguments sent as a JSON string holding the JSON: unwrap it
            try:
                value = json.loads(raw)
                raw = value if isinstance(value, str) else raw
            except json.JSONDecodeError:
                pass
        parser._emit_arguments(raw, deltas)
        self.args_done = True

    def finish(self, parser: ToolCallParser, deltas: list) -> None:
        """The object closed, or its block or the output ended inside it."""
        if self.closed:
            return
        self.closed = True
        if self.header and self.args_kind is not None:
            if not self.args_done and self.args_kind != "raw":
                self._finish_args(parser, deltas)
            return  # raw arguments have streamed already (cut short if the object was)
        try:
            obj = json.loads(self.buf)
        except json.JSONDecodeError:
            obj = None
        if not self.header:
            if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and obj["name"]):
                return  # malformed: skipped
            parser._emit_header(obj["name"], deltas)
        args = obj.get("arguments", {}) if isinstance(obj, dict) else {}
        parser._emit_arguments(args if isinstance(args, str) else json.dumps(args, ensure_ascii=False), deltas)


def _merge(deltas: list[dict]) -> list[dict]:
    """Consecutive argument pieces of one call become one delta (the first delta, with the name, stays apart)."""
    out = []
    for d in deltas:
        if out and d.keys() == {"index", "function"} and out[-1].keys() == d.keys() \
                and out[-1]["index"] == d["index"]:
            last = out[-1]["function"]
            last["arguments"] = last.get("arguments", "") + d["function"]["arguments"]
        else:
            out.append({**d, "function": dict(d["function"])})
    return out

