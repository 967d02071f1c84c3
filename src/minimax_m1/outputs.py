"""Results returned by LLM.generate and the engine, shaped as vLLM's."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass
class Logprob:
    """vLLM's: a token's log probability, its rank in the distribution (1 = the most likely; None where the
    engine did not say: a sampled token outside the top k), and its text."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# What LLM.generate returns per position: {token id: Logprob}. The engine's own outputs still carry
# {token id: logprob float} entries (the server reads those); `to_logprobs` converts.
LogprobEntry = dict[int, Logprob]


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS or stop string/token), "length", "abort", "error"
    stop_reason: int | str | None = None
    # per generated token: {token id: logprob} from the engine; {token id: Logprob} from LLM.generate
    logprobs: list[dict[int, float]] | list[LogprobEntry] | None = None
    cumulative_logprob: float | None = None  # the sum of the sampled tokens' logprobs (when they were computed)
    error: str | None = None  # with finish_reason "error": what failed


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # per prompt token (the first None: nothing predicts it): {token id: Logprob}, when prompt_logprobs is set
    prompt_logprobs: list[LogprobEntry | None] | None = None


def to_logprobs(entries: list[dict[int, float]], token_ids: list[int], k: int,
                decode: Callable[[int], str] | None = None) -> list[LogprobEntry]:
    """The engine's entries (per position: the top k tokens, plus the sampled token) -> {id: Logprob}.
    Ranks follow the order of the logprobs; the sampled token outside the top k gets rank None (the entry
    does not tell how far down it was)."""
    out = []
    for entry, token in zip(entries, token_ids):
        ranked = sorted(entry.items(), key=lambda kv: -kv[1])
        extra = len(entry) > k  # the sampled token is not among the top k
        top = [(t, lp) for t, lp in ranked if not (extra and t == token)]
        converted = {t: Logprob(lp, rank, decode(t) if decode else None) for rank, (t, lp) in enumerate(top, 1)}
        if extra:
            converted[token] = Logprob(entry[token], None, decode(token) if decode else None)
        out.append(converted)
    return out


def cumulative_logprob(entries: list[dict[int, float]] | None, token_ids: list[int]) -> float | None:
    if entries is None:
        return None
    return float(sum(entry[t] for entry, t in zip(entries, token_ids)))
