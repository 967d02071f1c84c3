"""What a request constrains its output to, named as vLLM names it (`StructuredOutputsParams`), and the
OpenAI/vLLM request fields that say it: response_format (json_object, json_schema), structured_outputs,
guided_json, guided_regex, guided_choice, guided_grammar."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of json (a JSON schema, dict or text), regex, choice (a list of strings), grammar (Lark, or
    llama.cpp's GBNF) and json_object (any JSON object). The options shape JSON output:
    disable_any_whitespace: no whitespace between JSON tokens; whitespace_pattern: the regex for it;
    disable_additional_properties: objects take only the properties their schema lists.
    after_reasoning: the model may reason first: a <think>...</think> block is let through unconstrained, and
    the constraint holds from its end (from the first token when the output does not start with <think>)."""
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    after_reasoning: bool = False

    def __post_init__(self):
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured outputs take exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) if given else 'none'}")
        if isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
            object.__setattr__(self, "json", schema)
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError(f"a JSON schema must be an object, got {type(self.json).__name__}")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError(f"choice must be a non-empty list of non-empty strings, got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("regex", "grammar", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> str:
        """One string per distinct constraint (the compiled-grammar cache key)."""
        value = getattr(self, self.kind)
        return json.dumps([self.kind, value, self.disable_any_whitespace, self.disable_additional_properties,
                           self.whitespace_pattern], sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_dict(cls, value: dict[str, Any] | StructuredOutputsParams) -> StructuredOutputsParams:
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs must be an object, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"structured_outputs: unsupported field(s) {', '.join(unknown)}; it takes "
                             f"{', '.join(sorted(known))}")
        return cls(**{k: v for k, v in value.items() if v is not None})


def from_response_format(response_format: dict[str, Any] | None) -> StructuredOutputsParams | None:
    """OpenAI's response_format: {"type": "text"} (None), {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind in (None, "text"):
        if kind is None:
            raise ValueError(f"response_format must be {{'type': 'text' | 'json_object' | 'json_schema'}}, "
                             f"got {response_format!r}")
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            raise ValueError("response_format json_schema needs json_schema.schema (the JSON schema)")
        return StructuredOutputsParams(json=schema)
    raise ValueError(f"response_format type {kind!r} is not supported: use text, json_object or json_schema")


def from_request(*, response_format: dict | None = None, structured_outputs: dict | None = None,
                 guided_json: str | dict | None = None, guided_regex: str | None = None,
                 guided_choice: list[str] | None = None,
                 guided_grammar: str | None = None) -> StructuredOutputsParams | None:
    """The one constraint a chat or completion request asks for (None: none); several are an error."""
    asked = {name: value for name, value in [
        ("response_format", from_response_format(response_format)),
        ("structured_outputs", None if structured_outputs is None else StructuredOutputsParams.from_dict(
            structured_outputs)),
        ("guided_json", None if guided_json is None else StructuredOutputsParams(json=guided_json)),
        ("guided_regex", None if guided_regex is None else StructuredOutputsParams(regex=guided_regex)),
        ("guided_choice", None if guided_choice is None else StructuredOutputsParams(choice=guided_choice)),
        ("guided_grammar", None if guided_grammar is None else StructuredOutputsParams(grammar=guided_grammar)),
    ] if value is not None}
    if len(asked) > 1:
        raise ValueError(f"give one output constraint, not {' and '.join(asked)}")
    return next(iter(asked.values()), None)
