"""Grammars through llguidance: compile a constraint once (cached by its key), then one matcher per request
that advances with each accepted token and fills that request's row of the token bitmask."""
from __future__ import annotations

import collections
import json
import threading
from collections.abc import Sequence

import llguidance
import torch

from .params import StructuredOutputsParams

# Whitespace between JSON tokens: JSON's four characters, at most 32 in a row. Any amount (vLLM's default)
# lets a weak or random model write whitespace forever; 32 still fits indented output 15 levels deep.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,32}"


class UnsupportedGrammarError(ValueError):
    """The constraint cannot be compiled (an unsupported JSON-schema feature, a bad regex or grammar)."""


class GrammarMatcher:
    """One request's position in its grammar. Advance it with every token the request samples."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_token_ids: Sequence[int]):
        self._m = matcher
        self._eos = set(eos_token_ids)

    def accept(self, token_id: int) -> bool:
        """Take a sampled token; False when the grammar does not allow it (the matcher is then in error)."""
        if self._m.is_stopped() and token_id in self._eos:
            return True  # the grammar is complete: the end-of-sequence token closes the output
        return self._m.consume_token(token_id)

    @property
    def is_terminated(self) -> bool:
        """The output is complete: the grammar allows nothing more than the end of the sequence."""
        return self._m.is_stopped()

    @property
    def is_accepting(self) -> bool:
        """The output so far is complete (the end-of-sequence token is allowed now)."""
        return self._m.is_accepting()

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None

    @property
    def llg(self) -> llguidance.LLMatcher:
        return self._m


class GrammarCompiler:
    """Turns StructuredOutputsParams into matchers for one tokenizer and vocabulary.

    tokenizer: our Tokenizer (its `tokenizers` JSON is what llguidance reads); vocab_size: the model's logits
    width (the bitmask's; ids past the tokenizer's are never allowed); eos_token_ids: what ends a request."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int], cache_size: int = 256):
        if not eos_token_ids:
            raise ValueError("structured outputs need an end-of-sequence token: this model has none")
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.ll_tokenizer = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size,
                                                   eos_token=self.eos_token_ids)
        # compiled grammars: a matcher at the start of each, copied per request (a copy costs about a
        # microsecond, building one milliseconds to seconds)
        self._cache: collections.OrderedDict[str, llguidance.LLMatcher] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # compile may run on the server's threads

    def compile(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The compiled grammar for params (a pristine matcher: never advance it); raises
        UnsupportedGrammarError, saying what, when params cannot be compiled for this tokenizer."""
        key = params.key
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = llguidance.LLMatcher(self.ll_tokenizer, _grammar(params), log_level=0)
        if compiled.is_error():
            raise UnsupportedGrammarError(f"the {_describe(params)} is not supported: "
                                          f"{compiled.get_error().strip()}")
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, params: StructuredOutputsParams) -> GrammarMatcher:
        """A new request's matcher, at the start of its grammar."""
        return GrammarMatcher(self.compile(params).deep_copy(), self.eos_token_ids)


def _describe(params: StructuredOutputsParams) -> str:
    return {"json": "JSON schema", "json_object": "JSON object constraint", "regex": "regex",
            "choice": "choice", "grammar": "grammar"}[params.kind]


def _grammar(params: StructuredOutputsParams) -> str:
    kind = params.kind
    if kind in ("json", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else params.json
        options = {"whitespace_flexible": not params.disable_any_whitespace,
                   "whitespace_pattern": params.whitespace_pattern or JSON_WHITESPACE}
        if params.disable_any_whitespace:
            options = {"whitespace_flexible": False}
        if params.disable_additional_properties and isinstance(schema, dict):
            schema = _no_additional_properties(schema)
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=options)
        except ValueError as e:
            raise UnsupportedGrammarError(f"the JSON schema is not supported: {e}") from e
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        return llguidance.grammar_from("choice", list(params.choice))
    try:
        return llguidance.grammar_from("grammar", params.grammar)  # Lark, or GBNF converted to Lark
    except ValueError as e:
        raise UnsupportedGrammarError(f"the grammar is not supported: {e}") from e


def _no_additional_properties(schema):
    """Every object schema in `schema` with additionalProperties false unless it says otherwise."""
    if isinstance(schema, list):
        return [_no_additional_properties(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _no_additional_properties(v) for k, v in schema.items()}
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


# ---- the batch's token bitmask ---------------------------------------------------------------------


def allocate_token_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """[num_rows, ceil(vocab_size / 32)] int32 on the host (pinned where CUDA is, so the copy to the device
    can overlap): bit j of word w allows token 32 * w + j. All bits set: everything allowed."""
    shape = (num_rows, (vocab_size + 31) // 32)
    return torch.full(shape, -1, dtype=torch.int32, pin_memory=torch.cuda.is_available())


_executor: llguidance.LLExecutor | None = None


def fill_token_bitmask(bitmask: torch.Tensor, matchers: Sequence[GrammarMatcher | None]) -> bool:
    """Fill row i from matchers[i] (all ones where it is None: that request has no grammar), the grammar rows
    in parallel on CPU threads. Returns whether any row is constrained (no mask to apply when none is)."""
    global _executor
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous():
        raise ValueError("the token bitmask must be a contiguous int32 CPU tensor (see allocate_token_bitmask)")
    if bitmask.shape[0] < len(matchers):
        raise ValueError(f"the token bitmask has {bitmask.shape[0]} rows for {len(matchers)} requests")
    rows = [(m.llg, i) for i, m in enumerate(matchers) if m is not None]
    free = [i for i, m in enumerate(matchers) if m is None]
    if free:
        bitmask[free] = -1
    if not rows:
        return False
    if _executor is None:
        _executor = llguidance.LLExecutor()
    _executor.unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])
    return True


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [N, V] (any float dtype, CPU or CUDA), bitmask [N, ceil(V/32)] int32 on the host: set the
    disallowed tokens to -inf, in place. One host-to-device copy (asynchronous from pinned memory) and
    element-wise ops on the device: no per-row work, no wait for the device. Rows that are all ones stay
    as they were. Returns logits.

    The caller must not refill `bitmask` until the copy has run: the sampler's reading back of the sampled
    tokens (each step) orders that. This runs outside any captured CUDA graph, on the logits it returns."""
    return logits.masked_fill_(~allowed_tokens(bitmask, *logits.shape, logits.device), float("-inf"))


def allowed_tokens(bitmask: torch.Tensor, n: int, vocab: int, device) -> torch.Tensor:
    """The first n rows of the host bitmask as bool [n, vocab] on device (True: allowed): one host-to-device
    copy (asynchronous from pinned memory) and element-wise ops, no wait for the device."""
    if bitmask.shape[0] < n or bitmask.shape[1] * 32 < vocab:
        raise ValueError(f"the token bitmask {tuple(bitmask.shape)} does not cover logits {(n, vocab)}")
    dev = torch.device(device)
    if dev not in _SHIFTS:
        _SHIFTS[dev] = torch.arange(32, dtype=torch.int32, device=dev)
    words = bitmask[:n].to(dev, non_blocking=True)
    return ((words.unsqueeze(-1) >> _SHIFTS[dev]) & 1).view(n, -1)[:, :vocab] != 0
