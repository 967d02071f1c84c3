"""Tokenizer and chat template: the checkpoint's tokenizer.json through `tokenizers`, the chat template
from its tokenizer_config.json; the `tiny` preset builds a byte-level tokenizer of its own."""
from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# MiniMax-M1's special tokens, as its chat template and tokenizer_config.json name them.
BOS, EOS, BOD, EOD = "<beginning_of_sentence>", "<end_of_sentence>", "<begin_of_document>", "<end_of_document>"
TINY_SPECIALS = [BOS, EOS, BOD, EOD]
THINK_TAGS = ["<think>", "</think>"]  # ordinary added tokens: decoding keeps them
_GIL_FREE_CHARS = 4096

# The released chat template's format (system/user/assistant turns, the tools turn, tool results), written for
# the tiny model: system turns stay where they are (the released template gathers them first).
TINY_CHAT_TEMPLATE = (
    "{{ '<begin_of_document>' -}}"
    "{% if tools -%}{{ '<beginning_of_sentence>system tool_setting=tools\nYou are provided with these tools:\n"
    "<tools>\n' -}}{% for tool in tools -%}{{ tool | tojson ~ '\n' -}}{%- endfor -%}"
    "{{ '</tools>\n\nIf you need to call tools, please respond with <tool_calls></tool_calls> XML tags, and "
    "provide tool-name and json-object of arguments, following the format below:\n<tool_calls>\n"
    "{\"name\": <tool-name>, \"arguments\": <args-json-object>}\n...\n</tool_calls><end_of_sentence>\n' -}}"
    "{%- endif -%}"
    "{% for message in messages -%}"
    "{% if message['role'] == 'system' -%}{{ '<beginning_of_sentence>system ai_setting=assistant\n' "
    "+ message['content'][0]['text'] + '<end_of_sentence>\n' -}}"
    "{% elif message['role'] == 'user' -%}{{ '<beginning_of_sentence>user name=user\n' "
    "+ message['content'][0]['text'] + '<end_of_sentence>\n' -}}"
    "{% elif message['role'] == 'assistant' -%}{{ '<beginning_of_sentence>ai name=assistant\n' -}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ content['text'] -}}"
    "{%- endfor -%}{{ '<end_of_sentence>\n' -}}"
    "{% elif message['role'] == 'tool' -%}{{ '<beginning_of_sentence>tool name=tools\n' -}}"
    "{% for content in message['content'] -%}{{ 'tool name: ' + content['name'] + '\ntool result: ' "
    "+ content['text'] + '\n\n' -}}{%- endfor -%}{{ '<end_of_sentence>\n' -}}"
    "{% endif -%}{%- endfor -%}"
    "{% if add_generation_prompt -%}{{ '<beginning_of_sentence>ai name=assistant\n' -}}{%- endif -%}"
)
TOOL_CALLS_START, TOOL_CALLS_END = "<tool_calls>", "</tool_calls>"
ROLES = ("system", "developer", "user", "assistant", "tool")
_CONTINUE = "<|continue_final_message|>"  # marks where the final message's text ends in a rendered prompt


def _byte_alphabet() -> list[str]:
    """The byte-level BPE alphabet: printable bytes stand for themselves, the rest map above U+0100."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


class Tokenizer:
    """Encode/decode plus what generation needs: EOS ids and the chat template."""

    def __init__(self, tok: HFTokenizer, eos_token: str | None, bos_token: str | None, chat_template: str | None):
        self._tok = tok
        self.eos_token_ids = [] if eos_token is None or tok.token_to_id(eos_token) is None else [tok.token_to_id(eos_token)]
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if len(text) > _GIL_FREE_CHARS:  # encode_batch releases the GIL (encode holds it): other threads
            return self._tok.encode_batch([text], add_special_tokens=False)[0].ids  # (a server's) go on
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def to_json(self) -> str:
        """The `tokenizers` JSON (what grammar engines read to know every token's bytes)."""
        return self._tok.to_str()

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list | None = None, *, chat_template: str | None = None,
                            continue_final_message: bool = False, **template_kwargs) -> str:
        """OpenAI-shaped messages (and tools) -> the prompt text, through the checkpoint's chat template (or
        chat_template). continue_final_message: end the prompt inside the final (assistant) message, so the
        model continues its text. template_kwargs: extra variables for the template (chat_template_kwargs)."""
        template_text = chat_template or self.chat_template
        if not template_text:
            raise ValueError("this model's tokenizer_config.json has no chat_template; pass plain prompts instead")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set: the prompt "
                             "either continues the final message or opens a new one")
        rendered_messages = template_messages(messages)
        if continue_final_message:
            if not rendered_messages or rendered_messages[-1]["role"] != "assistant":
                raise ValueError("continue_final_message needs the final message to be the assistant's")
            last = rendered_messages[-1]["content"][-1]
            rendered_messages[-1]["content"][-1] = {**last, "text": last["text"] + _CONTINUE}
        variables = {**template_kwargs, "messages": rendered_messages, "tools": template_tools(tools),
                     "add_generation_prompt": add_generation_prompt, "bos_token": self.bos_token,
                     "eos_token": self.eos_token}
        try:
            text = _compile_template(template_text).render(**variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template failed on these messages: {e}") from e
        if continue_final_message:
            if _CONTINUE not in text:
                raise ValueError("continue_final_message: the chat template does not show the final message's text")
            text = text[:text.index(_CONTINUE)]
        return text

    @classmethod
    def from_dir(cls, path: str | pathlib.Path) -> "Tokenizer":
        path = pathlib.Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        cfg = {}
        if (path / "tokenizer_config.json").is_file():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        return cls(HFTokenizer.from_file(str(tok_file)), _token_str(cfg.get("eos_token")),
                   _token_str(cfg.get("bos_token")), cfg.get("chat_template"))

    def save(self, path: str | pathlib.Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (used to give test checkpoints a tokenizer)."""
        path = pathlib.Path(path)
        self._tok.save(str(path / "tokenizer.json"))
        cfg = {"bos_token": self.bos_token, "eos_token": self.eos_token, "chat_template": self.chat_template}
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


def _token_str(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


@functools.lru_cache(maxsize=16)
def _compile_template(text: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    try:
        return env.from_string(text)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template does not compile: {e}") from e


def template_tools(tools: list | None) -> list[dict] | None:
    """OpenAI tools ({"type": "function", "function": {name, description, parameters}}) -> the function
    objects MiniMax-M1's template lists inside <tools></tools> (the function-call guide's shape, which is
    also accepted as it is)."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                             f"'parameters': ...}}}}, got {tool!r}")
        out.append(fn)
    return out


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages -> what MiniMax-M1's template reads: content as a list of {type, text} parts (text
    parts of one message joined by newlines), 'developer' as 'system', an assistant's `tool_calls` written into
    its text as the model writes them (a <tool_calls> block, one {"name", "arguments"} object a line), and
    tool results as {type, name, text} parts, consecutive `tool` messages in one turn (the function-call
    guide's "multiple results"); a result's name is its `name`, else that of the call its `tool_call_id`
    answers. Other keys pass through. An unknown role is an error."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        role = m["role"]
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has the unknown role {role!r}: use one of {', '.join(ROLES)}")
        role = "system" if role == "developer" else role
        text = _message_text(m.get("content"), i)
        msg = {**m, "role": role}
        if role == "assistant" and m.get("tool_calls"):
            block = _tool_call_block(m["tool_calls"], i, call_names)
            text = f"{text}\n{block}" if text else block
        if role == "tool":
            parts = _tool_result_parts(m, text, i, call_names)
            if out and out[-1]["role"] == "tool":
                out[-1]["content"].extend(parts)
                continue
            msg["content"] = parts
        else:
            msg["content"] = [{"type": "text", "text": text}]
        out.append(msg)
    return out


def _message_text(content, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"messages[{i}].content must be a string or a list of text parts, got {content!r}")
    texts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"messages[{i}].content: only text parts are supported, got {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_result_parts(m: dict, text: str, i: int, call_names: dict[str, str]) -> list[dict]:
    """A tool message -> {type, name, text} parts: the guide's own shape (parts that carry a name) as given,
    else one part named by `name` or by the call that `tool_call_id` answers."""
    content = m.get("content")
    if isinstance(content, list) and content and all(isinstance(p, dict) and p.get("name") for p in content):
        return [{**p, "text": _message_text([p], i)} for p in content]
    name = m.get("name") or call_names.get(m.get("tool_call_id"))
    if not name:
        raise ValueError(f"messages[{i}] (a tool result) has no 'name', and its tool_call_id "
                         f"{m.get('tool_call_id')!r} answers no earlier assistant tool call")
    return [{"type": "text", "name": name, "text": text, "tool_call_id": m.get("tool_call_id")}]


def _tool_call_block(tool_calls, i: int, call_names: dict[str, str]) -> str:
    """An assistant's OpenAI tool_calls -> the <tool_calls> block the model writes."""
    lines = []
    for j, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
            raise ValueError(f"messages[{i}].tool_calls[{j}] must be {{'id', 'type': 'function', 'function': "
                             f"{{'name', 'arguments'}}}}, got {call!r}")
        args = fn.get("arguments")
        args = {} if args in (None, "") else args
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:  # the model's own (broken) text: shown back as it was written
                lines.append(f'{{"name": {json.dumps(fn["name"], ensure_ascii=False)}, "arguments": {args}}}')
                args = None
        if args is not None:
            lines.append(json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False))
        if call.get("id"):
            call_names[call["id"]] = fn["name"]
    return "\n".join([TOOL_CALLS_START, *lines, TOOL_CALLS_END])


def tiny_tokenizer() -> Tokenizer:
    """A byte-level tokenizer: one token per byte, then the special tokens (vocab 262)."""
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(TINY_SPECIALS)
    tok.add_tokens([AddedToken(t, special=False) for t in THINK_TAGS])
    return Tokenizer(tok, EOS, BOS, TINY_CHAT_TEMPLATE)
