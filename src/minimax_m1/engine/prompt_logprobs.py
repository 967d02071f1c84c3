"""Prompt logprobs (vLLM's prompt_logprobs; the completions API's echo with logprobs): each prompt token's
log probability given the tokens before it, read off the request's own prefill. A chunk of a request that
asks for them runs as a step of its own with logits at every position (the path LLM.prompt_logits takes, so
both give the same numbers); the rest of the batch runs as usual."""
from __future__ import annotations

import torch

from ..outputs import Logprob
from .scheduler import ScheduledChunk


def wants_prompt_logprobs(seq) -> bool:
    """seq still has prompt positions whose logprobs are not recorded (a preempted request recomputes its
    prefill; what it recorded the first time stays)."""
    return seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < len(seq.prompt_token_ids)


def run_step(runner, chunks: list[ScheduledChunk]) -> torch.Tensor:
    """runner.run(chunks), recording prompt logprobs on the way: logits [R, vocab] for the completing chunks'
    last tokens, in the order of `chunks`."""
    scoring = [c for c in chunks if wants_prompt_logprobs(c.seq)]
    if not scoring:
        return runner.run(chunks)
    completes = {id(c) for c in chunks if c.completes}  # before run() advances num_computed
    rest = [c for c in chunks if not wants_prompt_logprobs(c.seq)]
    rows: dict[int, torch.Tensor] = {}
    if rest:
        logits = runner.run(rest)
        for c, row in zip([c for c in rest if id(c) in completes], logits):
            rows[id(c)] = row
    for c in scoring:
        start = c.seq.num_computed
        logits = runner.run([c], all_logits=True)
        record(c.seq, start, logits)
        if id(c) in completes:
            rows[id(c)] = logits[-1]
    done = [rows[id(c)] for c in chunks if id(c) in completes]
    return torch.stack(done) if done else torch.empty(0, 0)


@torch.inference_mode()
def record(seq, start: int, logits: torch.Tensor) -> None:
    """logits [n, vocab]: positions start .. start + n - 1 of seq; row j predicts token start + j + 1. Append
    the entries of the prompt tokens not yet recorded: {token id: Logprob} with the prompt token (its exact
    rank) and the k most likely (seq.params.prompt_logprobs = k); decoded_token is left to the front end."""
    ids, k = seq.prompt_token_ids, seq.params.prompt_logprobs
    first = len(seq.prompt_logprobs)  # the next prompt token without an entry
    last = min(start + logits.shape[0], len(ids) - 1)  # the last prompt token this chunk predicts
    if last < first:
        return
    assert first - 1 >= start, (first, start)  # every earlier chunk of seq was recorded
    lp = logits[first - 1 - start:last - start].float().log_softmax(-1)
    target = torch.tensor(ids[first:last + 1], device=lp.device)
    chosen = lp.gather(1, target[:, None])[:, 0]
    ranks = ((lp > chosen[:, None]).sum(-1) + 1).tolist()
    top = lp.topk(k) if k else None
    top_ids, top_lps = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
    for i, (token, value, rank) in enumerate(zip(ids[first:last + 1], chosen.tolist(), ranks)):
        entry = {t: Logprob(v, r) for r, (t, v) in enumerate(zip(top_ids[i], top_lps[i]), 1)} if top else {}
        entry[token] = Logprob(value, rank)
        seq.prompt_logprobs.append(entry)
