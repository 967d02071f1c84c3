"""Sampling over the whole batch: penalties, greedy, temperature, top-k, top-p, min-p, per-request seeds,
logprobs. Rows are independent: a seeded request draws from its own generator, so its tokens do not
depend on what else runs in the batch. What to do is decided from host-side settings (a SamplingBatch),
never by waiting for the GPU."""
from __future__ import annotations

import dataclasses

import torch

from ..host_tensors import from_list
from ..sampling_params import SamplingParams
from .logit_constraints import LogitConstraints, apply_constraints


@dataclasses.dataclass
class Penalties:
    """One row's penalties (vLLM's) and the token ids they count: host lists, not copies."""

    row: int
    repetition: float
    presence: float
    frequency: float
    seen_token_ids: list[int]  # prompt + output so far: repetition
    output_token_ids: list[int]  # presence and frequency


@dataclasses.dataclass
class SamplingBatch:
    """What the sampler needs about N rows. Tensors are on the host ([N], moved to the logits' device only
    when a row needs them); the lists are host-side decisions. `constraints` (logit_bias, min_tokens, bad
    words, a grammar's token bitmask) apply after the penalties."""

    temperatures: torch.Tensor  # [N] fp32, 0 = greedy
    top_k: torch.Tensor  # [N] int64, 0 = off
    top_p: torch.Tensor  # [N] fp32, 1 = off
    min_p: torch.Tensor  # [N] fp32, 0 = off
    greedy: list[bool]  # temperature 0: argmax, no draw
    generators: list[torch.Generator | None]  # a seeded row's own stream (None: the device's default)
    penalties: list[Penalties]  # only the rows that have one
    logprobs: list[int | None]  # top logprobs to return per row (None: none; 0: the sampled token's only)
    constraints: LogitConstraints | None = None

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator | None],
              token_ids: list[list[int]], output_token_ids: list[list[int]],
              constraints: LogitConstraints | None = None) -> SamplingBatch:
        """From each row's settings, generator, prompt + output token ids and output token ids."""
        temps = from_list([p.temperature for p in params], torch.float32)
        return cls(
            temperatures=temps,
            top_k=from_list([max(p.top_k, 0) for p in params], torch.int64),
            top_p=from_list([p.top_p for p in params], torch.float32),
            min_p=from_list([p.min_p for p in params], torch.float32),
            greedy=(temps == 0).tolist(),  # as the fp32 tensor has it (a temperature of 1e-50 is 0 there)
            generators=list(generators),
            penalties=[Penalties(i, p.repetition_penalty, p.presence_penalty, p.frequency_penalty, token_ids[i],
                                 output_token_ids[i])
                       for i, p in enumerate(params) if p.has_penalties],
            logprobs=[p.logprobs for p in params], constraints=constraints)


def apply_penalties(logits: torch.Tensor, penalties: list[Penalties]) -> torch.Tensor:
    """vLLM's penalties: repetition over prompt and output tokens (positive logits divided, negative
    multiplied); presence and frequency over output tokens. Returns a penalised copy (logits itself when no
    row has a penalty)."""
    if penalties:
        logits = logits.clone()
    for p in penalties:
        row = logits[p.row]
        if p.repetition != 1.0 and p.seen_token_ids:
            seen = torch.tensor(sorted(set(p.seen_token_ids)), device=logits.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition, vals * p.repetition)
        if p.output_token_ids and (p.presence or p.frequency):
            counts = torch.bincount(torch.tensor(p.output_token_ids, device=logits.device), minlength=row.shape[0])
            row -= p.frequency * counts + p.presence * (counts > 0)
    return logits


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device's stream: from pinned memory, asynchronously
    (a copy from pageable memory may synchronise with the stream, which would stall async scheduling)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p remove; each row has its own settings. The settings arrive
    on the host (what to do is decided there, without waiting for the GPU) and move to logits' device (_to)."""
    vocab = logits.shape[-1]
    dev = logits.device
    if bool((top_k < vocab).any()) or bool((top_p < 1).any()):
        top_k, top_p = _to(top_k, dev), _to(top_p, dev)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        drop = ranks >= top_k[:, None]
        probs = sorted_logits.softmax(-1)
        drop |= (probs.cumsum(-1) - probs) > top_p[:, None]  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    if bool((min_p > 0).any()):
        min_p = _to(min_p, dev)
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits [N, V] fp32 (one row per SamplingBatch row) -> (next token per row, logprobs per row or None)."""
    n = logits.shape[0]
    raw_logprobs = logits.log_softmax(-1) if any(k is not None for k in batch.logprobs) else None
    token_list = sample_tokens(logits, batch).tolist()

    logprobs = [None] * n
    if raw_logprobs is not None:
        for i, k in enumerate(batch.logprobs):
            if k is None:
                continue
            top = raw_logprobs[i].topk(k) if k > 0 else None
            entry = {} if top is None else dict(zip(top.indices.tolist(), top.values.tolist()))
            entry[token_list[i]] = raw_logprobs[i, token_list[i]].item()
            logprobs[i] = entry
    return token_list, logprobs


def sample_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The next token of every row, [N] int64 on logits' device, with no host sync (async scheduling feeds
    them to the next step on the device)."""
    vocab = logits.shape[-1]
    logits = apply_constraints(apply_penalties(logits, batch.penalties), batch.constraints)

    tokens = logits.argmax(-1)
    if not all(batch.greedy):
        temps = _to(batch.temperatures, logits.device)
        greedy = temps == 0
        top_k = torch.where(batch.top_k > 0, batch.top_k, vocab)
        scaled = logits / torch.where(greedy, 1.0, temps)[:, None]
        probs = _filter(scaled, top_k, batch.top_p, batch.min_p).softmax(-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; per-row noise keeps seeds independent
        noise = torch.empty_like(probs)
        for i, gen in enumerate(batch.generators):
            if not batch.greedy[i]:
                noise[i].exponential_(generator=gen)
        drawn = (probs / noise.clamp_(min=1e-30)).argmax(-1)
        tokens = torch.where(greedy, tokens, drawn)
    return tokens
