"""One request as the engine tracks it."""
from __future__ import annotations

import enum
import itertools

import torch

from ..sampling_params import SamplingParams
from .detokenizer import IncrementalDetokenizer

_arrival = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """detokenizer: turns the output tokens into text (None for work whose text nobody reads: profiling,
    prompt logits, benchmarks). generator: the request's own random stream when it has a seed, so its
    tokens do not depend on what else runs in the batch."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                 prompt: str | None = None, detokenizer: IncrementalDetokenizer | None = None,
                 generator: torch.Generator | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        # prompt + output as one list, kept alongside: a step reads single tokens of it, and building the
        # concatenation per step would cost O(context) per request
        self.token_ids: list[int] = list(prompt_token_ids)
        self.params = params
        self.arrival = next(_arrival)
        self.status = Status.WAITING
        # what the cache manager gave it (only the manager changes these)
        self.state_slot = -1
        self.blocks: list[int] = []
        self.num_computed = 0  # tokens whose state/KV the caches hold
        self.finish_reason: str | None = None
        self.stop_reason = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.detokenizer = detokenizer
        self.text = ""  # the output text as returned (stop strings cut off)
        self.sent_tokens = 0  # how much of the output "delta" outputs have already carried
        self.sent_chars = 0
        self.generator = generator
        self.constraints = None  # RequestConstraints: grammar, min_tokens, bad words (engine/constraints.py)
        # per prompt token {token id: Logprob} (the first None: nothing predicts it), when asked for
        self.prompt_logprobs: list | None = [None] if params.prompt_logprobs is not None else None
        self.sent_prompt_logprobs = False  # a "delta" output carries them once

    def append_token(self, token: int) -> None:
        self.output_token_ids.append(token)
        self.token_ids.append(token)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
