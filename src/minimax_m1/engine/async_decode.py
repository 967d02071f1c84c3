"""Async scheduling, the device half (`--async-scheduling`, vLLM's flag): in a run of decode steps, step N+1
is launched before step N's tokens reach the host. Its input tokens are step N's samples, copied on the
device; the host meanwhile waits only for step N's own copy of them, then appends them, checks stops and
builds outputs while step N+1 runs. Without it the device idles through that host work every step (at batch
1 on an H200 it was 0.16-0.22 ms of a 2.3 ms step).

The same tokens as synchronous steps: step N+1 computes for every sequence of step N what the next scheduled
step would have (one token each, the sampled one), since it runs only when nothing else could be scheduled instead: no
waiting request that could start now (a free slot and room in the batch; one that frees up when step N
ends joins a step later), every running sequence in the step, none with host-side sampling inputs (logprobs, penalties,
logit bias, min_tokens, bad words, grammars: they read the previous token on the host), and KV blocks for the
new position at hand. A sequence that step N finishes (EOS, a stop token, max_tokens, an abort) still runs
in step N+1; that row is dropped, and what it wrote into the caches it just gave back is overwritten before
it is read by whoever gets them next, since every step runs in order on one stream. What can differ is the
float rounding of batch composition (a void row may change the padded graph size; a request that finds a slot
only when step N ends joins a step later). It overlaps where decode steps replay CUDA graphs: an eager step's
torch fallbacks read lengths on the host (correct, but the host waits there). One device only: the other ranks
of a parallel engine would need the tokens too."""
from __future__ import annotations

import dataclasses

import torch

from .prompt_logprobs import wants_prompt_logprobs
from .sequence import Sequence


@dataclasses.dataclass
class InFlight:
    """A launched decode step whose tokens are not on the host yet."""

    seqs: list[Sequence]  # its rows, in order
    tokens: torch.Tensor  # [len(seqs)] int64 on the device
    host: torch.Tensor  # their copy on the host (pinned on CUDA): valid once `ready` has passed
    ready: torch.cuda.Event | None

    @classmethod
    def start(cls, seqs: list[Sequence], tokens: torch.Tensor) -> InFlight:
        """Queue the tokens' copy to the host behind the step (nothing waits here)."""
        if tokens.device.type != "cuda":
            return cls(seqs, tokens, tokens, None)
        stream = torch.cuda.current_stream(tokens.device)  # the copy's stream (not the current device's)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(stream)
        return cls(seqs, tokens, host, ready)

    def wait(self) -> list[int]:
        """The tokens, once this step (and only it, not what was queued after it) is done."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


def samples_on_device(seq: Sequence) -> bool:
    """Whether seq's next token can be drawn and fed on with nothing read on the host first."""
    p = seq.params
    return (p.logprobs is None and seq.constraints is None and not p.logit_bias and not p.has_penalties
            and p.max_tokens != 0 and not wants_prompt_logprobs(seq))
