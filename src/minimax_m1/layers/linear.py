"""Linear layers split over a distributed.Group, and the weight loaders every parameter carries.

A parameter's `load_plan(shard_id)` says, without reading any data, what this rank takes from one checkpoint
tensor: `(checkpoint shape, [(src, dst), ...])`, src a box of the checkpoint tensor and dst a box of the
parameter (tuples of slices with explicit bounds). Its `weight_loader(param, loaded, shard_id=None)` copies
those boxes; `loaded` is a tensor or anything indexable the same way (a lazy safetensors slice, dummy values),
so a rank reads only its own boxes. `shard_id` names a part of a parameter that the checkpoint stores as its
own tensor (an expert's w1, w3 or w2); None is the whole tensor. weights.py is a loop that calls these.

At world size 1 every layer here runs x W^T on its whole weight, what nn.Linear does: F.linear, or for
decode-sized batches on CUDA the GEMV of ops/gemv (the same product, fp32 sums rounded once).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..distributed import SINGLE, Group
from ..ops import gemv

Box = tuple[slice, ...]
Plan = tuple[tuple[int, ...], list[tuple[Box, Box]]]


def box(*bounds: tuple[int, int]) -> Box:
    """box((a, b), (c, d)) -> (slice(a, b), slice(c, d))."""
    return tuple(slice(a, b) for a, b in bounds)


def whole(shape) -> Box:
    return box(*((0, n) for n in shape))


def set_load_plan(param: nn.Parameter, plan: Callable[[object], Plan]) -> nn.Parameter:
    """Give `param` its load_plan and the weight_loader that follows it."""
    param.load_plan = plan
    param.weight_loader = load_by_plan
    return param


def load_by_plan(param: nn.Parameter, loaded, shard_id=None) -> None:
    """Copy this rank's boxes of `loaded` (the checkpoint tensor `shard_id`) into param, casting to its dtype."""
    shape, pieces = param.load_plan(shard_id)
    assert tuple(loaded.shape) == shape, (tuple(loaded.shape), shape)  # weights.py checks and names the tensor
    with torch.no_grad():
        for src, dst in pieces:
            param.data[dst].copy_(loaded[src])


def replicated(param: nn.Parameter) -> nn.Parameter:
    """Every rank holds and reads the whole tensor (norm weights, the router)."""
    shape = tuple(param.shape)
    full = whole(shape)

    def plan(shard_id) -> Plan:
        assert shard_id is None, shard_id
        return shape, [(full, full)]

    return set_load_plan(param, plan)


def head_range(num_heads: int, group: Group) -> tuple[int, int]:
    """[first, end) of the heads rank `group.rank` holds: num_heads/N each, or with fewer heads than ranks
    (N a multiple of num_heads) head rank*num_heads//N, replicated on N/num_heads ranks."""
    n, r = group.world_size, group.rank
    if num_heads >= n:
        assert num_heads % n == 0, (num_heads, n)
        per = num_heads // n
        return r * per, (r + 1) * per
    assert n % num_heads == 0, (num_heads, n)
    first = r * num_heads // n
    return first, first + 1


class ReplicatedLinear(nn.Module):
    """y = x W^T with the whole W on every rank (the MoE router)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = replicated(nn.Parameter(torch.empty(out_features, in_features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemv.linear(x, self.weight)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's rows (output features) split: rank r computes its slice of y, no collective.

    The rows come in heads of `head_size` rows (default: N equal blocks) and a rank takes whole heads, see
    head_range; its output is those heads' features, in order."""

    def __init__(self, in_features: int, out_features: int, group: Group = SINGLE, head_size: int | None = None):
        super().__init__()
        head_size = head_size or out_features // group.world_size
        assert out_features % head_size == 0, (out_features, head_size)
        first, end = head_range(out_features // head_size, group)
        self.rows = (first * head_size, end * head_size)  # this rank's rows of the checkpoint's W
        self.full_shape = (out_features, in_features)
        self.weight = set_load_plan(nn.Parameter(torch.empty(self.rows[1] - self.rows[0], in_features)), self._plan)

    def _plan(self, shard_id) -> Plan:
        assert shard_id is None, shard_id
        return self.full_shape, [(box(self.rows, (0, self.full_shape[1])), whole(self.weight.shape))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemv.linear(x, self.weight)


def column_parallel_parts(x: torch.Tensor, *layers: ColumnParallelLinear) -> list[torch.Tensor]:
    """[layer(x) for layer in layers] for column-parallel layers that read the same x (no collective): at decode
    sizes one GEMV launch for all of them (ops/gemv.linear_parts), the same products."""
    return gemv.linear_parts(x, [layer.weight for layer in layers])


class QKVParallelLinear(ColumnParallelLinear):
    """Column-parallel over whole attention heads of `head_rows` rows each: a softmax layer's q, k or v heads
    (KV heads replicated when there are fewer than ranks, as vLLM does), or the lightning layer's per-head
    [q | k | v] rows (3 * head_dim per head, so a contiguous block of rows is whole heads). The three
    projections of a softmax layer stay separate parameters, so world size 1 runs today's GEMMs."""

    def __init__(self, in_features: int, num_heads: int, head_rows: int, group: Group = SINGLE):
        super().__init__(in_features, num_heads * head_rows, group, head_size=head_rows)
        self.first_head = self.rows[0] // head_rows
        self.num_heads = (self.rows[1] - self.rows[0]) // head_rows  # on this rank


class RowParallelLinear(nn.Module):
    """y = x W^T with W's columns (input features) split: rank r multiplies its slice of x (a column-parallel
    layer's output) by its columns, and one all-reduce sums the partial outputs."""

    def __init__(self, in_features: int, out_features: int, group: Group = SINGLE):
        super().__init__()
        per = in_features // group.world_size
        assert per * group.world_size == in_features, (in_features, group.world_size)
        self.group = group
        self.cols = (group.rank * per, (group.rank + 1) * per)
        self.full_shape = (out_features, in_features)
        self.weight = set_load_plan(nn.Parameter(torch.empty(out_features, per)), self._plan)

    def _plan(self, shard_id) -> Plan:
        assert shard_id is None, shard_id
        return self.full_shape, [(box((0, self.full_shape[0]), self.cols), whole(self.weight.shape))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The sum runs in the activation dtype, as vLLM's: each rank's partial is already rounded to it once by
        # its GEMM (as the single-device output is), N-1 further roundings of values of the same size add
        # less than the bf16 step, and an fp32 reduction would double the bytes of ~230 latency-bound decode
        # messages and add two casts each. In fp32 (the tests) the sums agree with TP=1 to ~1e-6.
        return self.group.all_reduce(gemv.linear(x, self.weight))
