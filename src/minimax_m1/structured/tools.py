"""tool_choice "required" and a named function, enforced: a grammar for the <tool_calls> block MiniMax-M1
writes, each call {"name": one of the tools, "arguments": that tool's parameters schema}, one a line.

The answer starts with the block (a forced call skips the <think> part, as a JSON-schema forced call does in
vLLM). "required" takes one or more calls, a named function exactly one. The tool-call parser reads the result
like any other output."""
from __future__ import annotations

import json

from ..tokenizer import TOOL_CALLS_END, TOOL_CALLS_START, template_tools
from .params import StructuredOutputsParams


# each call as the model writes it (json.dumps' separators, no other whitespace): what it was trained on
_AS_WRITTEN = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def tool_choice_params(tools: list | None, tool_choice, parallel: bool = True) -> StructuredOutputsParams | None:
    """None for "auto", "none" or no tool_choice (nothing to enforce); else the grammar that forces calls.
    parallel False (OpenAI's parallel_tool_calls): "required" takes exactly one call."""
    if tool_choice in (None, "auto", "none"):
        return None
    functions = template_tools(tools) or []
    if not functions:
        raise ValueError(f"tool_choice {tool_choice!r} needs tools")
    if tool_choice == "required":
        chosen, repeat = functions, parallel
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools "
                             f"({', '.join(f['name'] for f in functions)})")
        repeat = False
    else:
        raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                         f"{{'name': ...}}}}, got {tool_choice!r}")
    calls = [_call_schema(f) for f in chosen]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema["x-guidance"] = _AS_WRITTEN
    call = f"%json {json.dumps(schema, ensure_ascii=False)}"
    body = 'call ("\\n" call)*' if repeat else "call"
    lark = (f"start: {json.dumps(TOOL_CALLS_START + chr(10))} {body} {json.dumps(chr(10) + TOOL_CALLS_END)}\n"
            f"call: {call}\n")
    return StructuredOutputsParams(grammar=lark)


def _call_schema(function: dict) -> dict:
    params = function.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}
