"""Tokenizer and chat template: the checkpoint's tokenizer.json through `tokenizers`, the chat template
from its tokenizer_config.json; the `tiny` preset builds a byte-level tokenizer of its own."""
from __future__ import annotations

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

# The released chat template's message format (system/user/assistant turns), without tool support.
TINY_CHAT_TEMPLATE = (
    "{{ '<begin_of_document>' -}}{% for message in messages -%}"
    "{% if message['role'] == 'system' -%}{{ '<beginning_of_sentence>system ai_setting=assistant\n' "
    "+ message['content'][0]['text'] + '<end_of_sentence>\n' -}}"
    "{% elif message['role'] == 'user' -%}{{ '<beginning_of_sentence>user name=user\n' "
    "+ message['content'][0]['text'] + '<end_of_sentence>\n' -}}"
    "{% elif message['role'] == 'assistant' -%}{{ '<beginning_of_sentence>ai name=assistant\n' -}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ content['text'] -}}"
    "{%- endfor -%}{{ '<end_of_sentence>\n' -}}{% endif -%}{%- endfor -%}"
    "{% if add_generation_prompt -%}{{ '<beginning_of_sentence>ai name=assistant\n' -}}{%- endif -%}"
)


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

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list | None = None) -> str:
        if not self.chat_template:
            raise ValueError("this model's tokenizer_config.json has no chat_template; pass plain prompts instead")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=[_content_parts(m) for m in messages], tools=tools,
                                   add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template failed on these messages: {e}") from e

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


def _content_parts(message: dict[str, Any]) -> dict[str, Any]:
    """The MiniMax template reads content as a list of {type, text} parts; accept plain strings too."""
    if not isinstance(message, dict) or "role" not in message:
        raise ValueError(f"a chat message must be a dict with 'role' and 'content', got {message!r}")
    content = message.get("content")
    if content is None:
        content = ""
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    return {**message, "content": content}


def tiny_tokenizer() -> Tokenizer:
    """A byte-level tokenizer: one token per byte, then the special tokens (vocab 262)."""
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(TINY_SPECIALS)
    tok.add_tokens([AddedToken(t, special=False) for t in THINK_TAGS])
    return Tokenizer(tok, EOS, BOS, TINY_CHAT_TEMPLATE)
