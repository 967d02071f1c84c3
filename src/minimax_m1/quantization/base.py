"""How a SparseMoE layer holds and runs its routed experts: one method object per layer (vLLM's pattern).

    method.create_weights(layer)                 the expert parameters, with this rank's load plans
    method.process_weights_after_loading(layer)  checks (and any layout work) once the checkpoint is in
    method.apply(layer, x, weights, experts)     the experts' partial output on this rank

`experts_method(None)` keeps the experts in the model dtype; "fp8" and "experts_int8" (fp8.py, int8.py) store
w13 [E, 2I, H] and w2 [E, H, I] in 8 bits with per-output-channel fp32 scales w13_scale [E, 2I] and w2_scale
[E, H] (ops/moe/quantized.py has the formats). The scales shard with the layer: w1/w3's with their rows under
tensor parallelism, w2's (one per hidden channel) whole on every rank; expert parallelism moves whole experts.

Quantisation at load: an 8-bit parameter's weight_loader takes each released tensor (one expert's w1, w3 or w2;
or one expert at a time of a packed tensor), rounds it to the model dtype (the values the bf16 model would
hold, so "quantised" and "bf16" share their weights), quantises its rows and writes this rank's part of q and
of the scales. A scale covers a whole row, so for w2 under tensor parallelism (a rank holds a column slice)
the loader reads the expert's whole w2 to find its row maxima: every rank then holds exactly its slice of the
one-device quantisation. A tensor already stored in the parameter's 8-bit type is copied as it is and its
scales load from their own tensor (the saved format, quantization/checkpoint.py).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import QuantConfig
from ..layers.linear import Plan, load_by_plan, set_load_plan
from ..ops.moe import moe_experts, moe_experts_quantized
from ..ops.moe.quantized import WEIGHT_DTYPES, quantize_weight


class QuantizationError(ValueError):
    """Loaded 8-bit experts whose scales are unusable (a damaged or mismatched checkpoint)."""


def _parameter(shape, dtype, plan, requires_grad: bool = False) -> nn.Parameter:
    return set_load_plan(nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=requires_grad), plan)


class ExpertsMethod:
    """Experts in the model dtype (no quantisation)."""

    name: str | None = None

    def create_weights(self, layer) -> None:
        e, i, h = layer.num_experts, layer.intermediate, layer.hidden
        dtype = torch.get_default_dtype()
        layer.w13 = _parameter((e, 2 * i, h), dtype, layer._w13_plan, requires_grad=True)  # as nn.Parameter's default
        layer.w2 = _parameter((e, h, i), dtype, layer._w2_plan, requires_grad=True)

    def process_weights_after_loading(self, layer) -> None:
        """Nothing to do for weights in the model dtype."""

    def apply(self, layer, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return moe_experts(x, experts, weights, layer.w13, layer.w2, foreign_ids=layer.expert_map is not None)


def scale_plan(weight_plan: Callable[[object], Plan]) -> Callable[[object], Plan]:
    """The load plan of a per-row scale, from its weight's: the same boxes without the last (input) dim."""
    def plan(shard_id) -> Plan:
        shape, pieces = weight_plan(shard_id)
        return shape[:-1], [(src[:-1], dst[:-1]) for src, dst in pieces]

    return plan


class PerChannelExperts(ExpertsMethod):
    """8-bit experts with per-output-channel scales; subclasses name the method (fp8.py, int8.py)."""

    def create_weights(self, layer) -> None:
        e, i, h = layer.num_experts, layer.intermediate, layer.hidden
        self.model_dtype = torch.get_default_dtype()  # float weights are rounded to it before quantising
        q = WEIGHT_DTYPES[self.name]
        layer.w13 = _parameter((e, 2 * i, h), q, layer._w13_plan)
        layer.w13_scale = _parameter((e, 2 * i), torch.float32, scale_plan(layer._w13_plan))
        layer.w2 = _parameter((e, h, i), q, layer._w2_plan)
        layer.w2_scale = _parameter((e, h), torch.float32, scale_plan(layer._w2_plan))
        layer.w13.weight_loader = lambda p, loaded, shard_id=None: self.load(p, layer.w13_scale, loaded, shard_id)
        layer.w2.weight_loader = lambda p, loaded, shard_id=None: self.load(p, layer.w2_scale, loaded, shard_id)

    @torch.no_grad()
    def load(self, param: nn.Parameter, scale: nn.Parameter, loaded, shard_id=None) -> None:
        """param's boxes of the checkpoint tensor `loaded` (a tensor or a lazy one with .shape, .dtype and box
        indexing): copied when stored in param's 8-bit type, else quantised row by row (see the module
        docstring), writing `scale` too."""
        if loaded.dtype == param.dtype:
            load_by_plan(param, loaded, shard_id)
            return
        assert loaded.dtype.is_floating_point and loaded.dtype.itemsize > 1, loaded.dtype  # weights.py dequantises
        shape, pieces = param.load_plan(shard_id)
        assert tuple(loaded.shape) == shape, (tuple(loaded.shape), shape)  # weights.py checks and names the tensor
        for src, dst in pieces:
            rows = src[:-1] + (slice(0, shape[-1]),)  # whole rows: a scale covers the full input dim
            for s, d in _per_expert(rows, dst):
                w = loaded[s].to(device=param.device).to(self.model_dtype)
                q, sc = quantize_weight(w, self.name)
                param.data[d].copy_(q[..., src[-1]])
                scale.data[d[:-1]].copy_(sc)

    def process_weights_after_loading(self, layer) -> None:
        for name in ("w13_scale", "w2_scale"):
            s = getattr(layer, name)
            if not bool((torch.isfinite(s) & (s > 0)).all()):
                raise QuantizationError(f"{self.name} experts: {name} of a MoE layer holds non-finite or "
                                        "non-positive scales; the checkpoint's scales are damaged or do not belong "
                                        "to its weights: quantise it again (minimax-m1 quantize)")

    def apply(self, layer, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return moe_experts_quantized(x, experts, weights, layer.w13, layer.w13_scale, layer.w2, layer.w2_scale,
                                     self.name, foreign_ids=layer.expert_map is not None)


def _per_expert(src: tuple[slice, ...], dst: tuple[slice, ...]):
    """(src, dst) boxes one expert at a time when the checkpoint tensor is a packed [E, ...] one (3-D boxes),
    so that the float temporary stays one expert's; a per-expert (2-D) tensor's box as it is."""
    if len(src) == 2:
        yield src, dst
        return
    for n in range(src[0].stop - src[0].start):
        yield ((slice(src[0].start + n, src[0].start + n + 1),) + src[1:],
               (slice(dst[0].start + n, dst[0].start + n + 1),) + dst[1:])


def experts_method(quant: QuantConfig | None) -> ExpertsMethod:
    """A fresh method object for one MoE layer."""
    if quant is None:
        return ExpertsMethod()
    from .fp8 import Fp8Experts
    from .int8 import Int8Experts

    return {"fp8": Fp8Experts, "experts_int8": Int8Experts}[quant.method]()
