"""Results returned by LLM.generate and the engine, shaped as vLLM's."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS or stop string/token), "length", "abort", "error"
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None  # per generated token: {token id: logprob}
    error: str | None = None  # with finish_reason "error": what failed


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
