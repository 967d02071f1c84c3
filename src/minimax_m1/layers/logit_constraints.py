"""What limits the next token beyond the sampling settings, applied to the logits after the penalties:
logit_bias (added), tokens blocked this step (min_tokens holds back EOS and the stop tokens; bad_words), and a
grammar's token bitmask. All of it is decided on the host and reaches the device as a few copies and
element-wise ops over the whole batch: no per-row work on the device, no wait for it. It runs on the logits a
step returns, so outside any captured CUDA graph.

The mask comes last, so that nothing after it can revive a forbidden token (a bias of +100 on a token the
grammar forbids stays -inf) and nothing does arithmetic on its -inf. A row is never left without a token: where
blocking would empty a grammar row (min_tokens against a grammar that allows only EOS now), the grammar's tokens
stand. So the softmax after it never sees a row of -inf, and never makes a NaN."""
from __future__ import annotations

import dataclasses

import torch

from ..structured.grammar import allowed_tokens


@dataclasses.dataclass
class LogitConstraints:
    """N rows' constraints as host data. bias_*: logit_bias entries (row, token, value); blocked_*: (row,
    token) pairs never to sample this step; bitmask: [>= N, ceil(V/32)] int32 on the host, rows without a
    grammar all ones (None when no row has one)."""

    bias_rows: list[int] = dataclasses.field(default_factory=list)
    bias_tokens: list[int] = dataclasses.field(default_factory=list)
    bias_values: list[float] = dataclasses.field(default_factory=list)
    blocked_rows: list[int] = dataclasses.field(default_factory=list)
    blocked_tokens: list[int] = dataclasses.field(default_factory=list)
    bitmask: torch.Tensor | None = None

    def __bool__(self) -> bool:
        return bool(self.bias_rows or self.blocked_rows or self.bitmask is not None)


def apply_constraints(logits: torch.Tensor, c: LogitConstraints | None) -> torch.Tensor:
    """logits [N, V] fp32 -> the constrained logits (a copy; logits itself when there is nothing to do)."""
    if not c:
        return logits
    n, vocab = logits.shape
    dev = logits.device
    logits = logits.clone()
    if c.bias_rows:  # flat indices: index_add_ and index_fill_ run without a device sync
        flat = torch.tensor([r * vocab + t for r, t in zip(c.bias_rows, c.bias_tokens)]).to(dev, non_blocking=True)
        values = torch.tensor(c.bias_values, dtype=logits.dtype).to(dev, non_blocking=True)
        logits.view(-1).index_add_(0, flat, values)
    blocked = None
    if c.blocked_rows:
        flat = torch.tensor([r * vocab + t for r, t in zip(c.blocked_rows, c.blocked_tokens)])
        blocked = torch.zeros(n, vocab, dtype=torch.bool, device=dev)
        blocked.view(-1).index_fill_(0, flat.to(dev, non_blocking=True), True)
    if c.bitmask is not None:
        grammar = allowed_tokens(c.bitmask, n, vocab, dev)
        if blocked is None:
            allowed = grammar
        else:
            allowed = grammar & ~blocked
            allowed = torch.where(allowed.any(-1, keepdim=True), allowed, grammar)
    elif blocked is not None:
        allowed = ~blocked
    else:
        return logits
    return logits.masked_fill_(~allowed, float("-inf"))
