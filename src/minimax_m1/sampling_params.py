"""Per-request sampling settings, named and defaulted as in vLLM."""
from __future__ import annotations

import dataclasses

from .structured.params import StructuredOutputsParams

INT32_MAX = 2**31 - 1  # counts (max_tokens, top_k) are host ints that become int32/int64 tensors
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes
MAX_STOP_STRINGS = 64
MAX_STOP_TOKEN_IDS = 1024


class SamplingParamsError(ValueError):
    """A bad sampling setting; `param` names it (as the OpenAI API names the field)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass
class SamplingParams:
    """temperature 0 means greedy. top_k <= 0 (or -1) and top_p 1 turn those filters off.
    max_tokens None means: up to the model's context length; 0: generate nothing (scoring a prompt: with
    prompt_logprobs, the prompt is run and its logprobs returned)."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # what each engine output carries: everything so far ("cumulative"), only what is new ("delta", for
    # streaming: no copying that grows with the output), or nothing until the end ("final_only")
    output_kind: str = "cumulative"

    # ---- vLLM's fields for several answers, scoring and constraints ------------------------------------
    n: int = 1  # answers per prompt (LLM.generate makes n requests; seeds seed, seed + 1, ...)
    best_of: int | None = None  # sample this many, keep the n of highest cumulative logprob
    min_tokens: int = 0  # no EOS or stop before this many tokens
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    prompt_logprobs: int | None = None  # logprobs of every prompt token (plus this many top tokens)
    bad_words: list[str] | None = None  # words never to generate
    structured_outputs: StructuredOutputsParams | dict | None = None  # a JSON schema, regex, choice, grammar

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = [
            ("max_tokens", self.max_tokens is None or (_is_int(self.max_tokens) and 0 <= self.max_tokens <= INT32_MAX),
             f"max_tokens must be an integer in [0, {INT32_MAX}], got {self.max_tokens!r}"),
            ("temperature", self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            ("top_p", 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            ("top_k", _is_int(self.top_k) and -1 <= self.top_k <= INT32_MAX,
             f"top_k must be -1, 0 (off) or positive, got {self.top_k!r}"),
            ("min_p", 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            ("seed", self.seed is None or (_is_int(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]),
             f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}"),
            ("repetition_penalty", self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            ("logprobs", self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
             f"logprobs must be an integer in [0, 20], got {self.logprobs!r}"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop!r}"),
            ("stop", len(self.stop) <= MAX_STOP_STRINGS,
             f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed"),
            ("stop_token_ids", all(_is_int(t) and 0 <= t <= INT32_MAX for t in self.stop_token_ids),
             f"stop_token_ids must be non-negative integers, got {self.stop_token_ids[:8]!r}"),
            ("stop_token_ids", len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
             f"stop_token_ids has {len(self.stop_token_ids)} entries; at most {MAX_STOP_TOKEN_IDS} are allowed"),
            ("output_kind", self.output_kind in ("cumulative", "delta", "final_only"),
             f"output_kind must be 'cumulative', 'delta' or 'final_only', got {self.output_kind!r}"),
        ]
        for param, ok, message in checks:
            if not ok:
                raise SamplingParamsError(param, message)
        self._check_vllm_fields()

    def _check_vllm_fields(self) -> None:
        try:
            if self.logit_bias is not None:
                self.logit_bias = _logit_bias(self.logit_bias) or None
        except ValueError as e:
            raise SamplingParamsError("logit_bias", str(e)) from None
        if self.bad_words is not None:
            self.bad_words = [self.bad_words] if isinstance(self.bad_words, str) else list(self.bad_words)
            self.bad_words = self.bad_words or None
        if self.structured_outputs is not None:
            try:
                self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
            except ValueError as e:
                raise SamplingParamsError("structured_outputs", str(e)) from None
        checks = [
            ("n", _is_int(self.n) and self.n >= 1, f"n must be a positive integer, got {self.n!r}"),
            ("best_of", self.best_of is None or (_is_int(self.best_of) and isinstance(self.n, int)
                                      and self.best_of >= self.n),
             f"best_of must be an integer >= n ({self.n}), got {self.best_of!r}"),
            ("min_tokens", _is_int(self.min_tokens) and 0 <= self.min_tokens <= INT32_MAX,
             f"min_tokens must be a non-negative integer, got {self.min_tokens!r}"),
            ("min_tokens", self.max_tokens is None or not _is_int(self.min_tokens) or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"),
            ("prompt_logprobs", self.prompt_logprobs is None
             or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20),
             f"prompt_logprobs must be an integer in [0, 20], got {self.prompt_logprobs!r}"),
            ("bad_words", self.bad_words is None or all(isinstance(w, str) and w for w in self.bad_words),
             f"bad_words must be non-empty strings, got {self.bad_words!r}"),
        ]
        for param, ok, message in checks:
            if not ok:
                raise SamplingParamsError(param, message)

    def for_choice(self, i: int) -> SamplingParams:
        """The settings of answer i of several (n or best_of): one answer each, and with a seed, answer i
        uses seed + i, so that each is reproducible and they differ."""
        seed = self.seed if self.seed is None else self.seed + i
        return dataclasses.replace(self, n=1, best_of=None, prompt_logprobs=None, seed=seed)

    @property
    def num_samples(self) -> int:
        """How many answers to sample per prompt (best_of, else n)."""
        return self.best_of or self.n

    def check_vocab(self, vocab_size: int) -> None:
        """The bounds that depend on the model: top_k and stop_token_ids within the vocabulary."""
        if self.top_k > vocab_size:
            raise SamplingParamsError("top_k", f"top_k must be at most the vocabulary size {vocab_size} "
                                               f"(or -1/0 for off), got {self.top_k}")
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise SamplingParamsError("stop_token_ids", f"stop_token_ids must be in [0, {vocab_size}), got {bad[:8]}")
        bad = [t for t in self.logit_bias or {} if not 0 <= t < vocab_size]
        if bad:
            raise SamplingParamsError("logit_bias", f"logit_bias keys must be token ids in [0, {vocab_size}), "
                                                    f"got {bad[:8]}")

    @property
    def has_penalties(self) -> bool:
        """Any of the repetition, presence or frequency penalties (they read the token history)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _logit_bias(bias) -> dict[int, float]:
    """OpenAI sends token ids as JSON object keys (strings): take those too."""
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must map token ids to biases, got {bias!r}")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ValueError(f"logit_bias[{key!r}] must be a number in [-100, 100], got {value!r}")
        out[token] = float(value)
    return out
