"""Sampling over the whole batch: penalties, greedy, temperature, top-k, top-p, min-p, per-request seeds,
logprobs. Rows are independent: a seeded request draws from its own generator, so its tokens do not
depend on what else runs in the batch."""
from __future__ import annotations

import torch


def apply_penalties(logits: torch.Tensor, seqs) -> torch.Tensor:
    """vLLM's penalties: repetition over prompt and output tokens (positive logits divided, negative
    multiplied); presence and frequency over output tokens. Returns a penalised copy (logits itself when no
    row has a penalty)."""
    rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0
            or s.params.presence_penalty != 0.0 or s.params.frequency_penalty != 0.0]
    if rows:
        logits = logits.clone()
    for i in rows:
        p, s = seqs[i].params, seqs[i]
        row = logits[i]
        if p.repetition_penalty != 1.0 and s.num_tokens:
            seen = torch.tensor(sorted(set(s.token_ids)), device=logits.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if s.output_token_ids and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(s.output_token_ids, device=logits.device), minlength=row.shape[0])
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p remove; each row has its own settings. The settings arrive
    on the host (what to do is decided there, without waiting for the GPU) and move to logits' device."""
    vocab = logits.shape[-1]
    dev = logits.device
    if bool((top_k < vocab).any()) or bool((top_p < 1).any()):
        top_k, top_p = top_k.to(dev), top_p.to(dev)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        drop = ranks >= top_k[:, None]
        probs = sorted_logits.softmax(-1)
        drop |= (probs.cumsum(-1) - probs) > top_p[:, None]  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    if bool((min_p > 0).any()):
        min_p = min_p.to(dev)
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits [N, V] fp32 (one row per sequence) -> (next token per row, logprobs per row or None)."""
    n, vocab = logits.shape
    want_logprobs = [s.params.logprobs for s in seqs]
    raw_logprobs = logits.log_softmax(-1) if any(k is not None for k in want_logprobs) else None
    logits = apply_penalties(logits, seqs)

    tokens = logits.argmax(-1)
    temps = torch.tensor([s.params.temperature for s in seqs])  # on the host: no wait for the GPU per row
    row_greedy = (temps == 0).tolist()
    if not all(row_greedy):
        temps = temps.to(logits.device)
        greedy = temps == 0
        top_k = torch.tensor([s.params.top_k if s.params.top_k > 0 else vocab for s in seqs])
        top_p = torch.tensor([s.params.top_p for s in seqs])
        min_p = torch.tensor([s.params.min_p for s in seqs])
        scaled = logits / torch.where(greedy, 1.0, temps)[:, None]
        probs = _filter(scaled, top_k, top_p, min_p).softmax(-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; per-row noise keeps seeds independent
        noise = torch.empty_like(probs)
        for i, s in enumerate(seqs):
            if not row_greedy[i]:
                noise[i].exponential_(generator=s.generator)
        drawn = (probs / noise.clamp_(min=1e-30)).argmax(-1)
        tokens = torch.where(greedy, tokens, drawn)
    token_list = tokens.tolist()

    logprobs = [None] * n
    if raw_logprobs is not None:
        for i, k in enumerate(want_logprobs):
            if k is None:
                continue
            top = raw_logprobs[i].topk(k) if k > 0 else None
            entry = {} if top is None else dict(zip(top.indices.tolist(), top.values.tolist()))
            entry[token_list[i]] = raw_logprobs[i, token_list[i]].item()
            logprobs[i] = entry
    return token_list, logprobs
