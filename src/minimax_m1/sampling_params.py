"""Per-request sampling settings, named and defaulted as in vLLM."""
from __future__ import annotations

import dataclasses

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
    max_tokens None means: up to the model's context length."""

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

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = [
            ("max_tokens", self.max_tokens is None or (_is_int(self.max_tokens) and 1 <= self.max_tokens <= INT32_MAX),
             f"max_tokens must be an integer in [1, {INT32_MAX}], got {self.max_tokens!r}"),
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

    def check_vocab(self, vocab_size: int) -> None:
        """The bounds that depend on the model: top_k and stop_token_ids within the vocabulary."""
        if self.top_k > vocab_size:
            raise SamplingParamsError("top_k", f"top_k must be at most the vocabulary size {vocab_size} "
                                               f"(or -1/0 for off), got {self.top_k}")
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise SamplingParamsError("stop_token_ids", f"stop_token_ids must be in [0, {vocab_size}), got {bad[:8]}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
