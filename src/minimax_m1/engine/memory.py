"""What a model needs in memory, from its config alone, and a refusal before any of it is allocated.

Every size is per rank of a tensor-parallel group of `tp` ranks (tp=1: the whole model on one device), for
the layout of the parallel layers: lightning and softmax heads split over the ranks (KV heads replicated once
tp exceeds their count), experts split on their intermediate dimension (or, with expert parallelism, whole
experts over the ranks), the embedding and the head split over the vocabulary, the router and the hidden-size
norms replicated. Where a count does not divide, the busiest rank is the one counted. Sizes are bytes; messages
print decimal GB, as the model card's 912 GB does.

For MiniMax-M1 (docs/minimax-m1.md): 456.1B parameters, 912 GB in bf16, about 477 GB with 8-bit experts; one
request's lightning state is 280 MiB (70 layers x 64 heads x 128 x 128 fp32); KV is 40 KiB per token.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Collection

import torch

from ..config import ModelConfig, UserError

logger = logging.getLogger(__name__)

STATE_DTYPE_BYTES = 4  # the lightning state is fp32 whatever the model's dtype
# Options that shrink what one device must hold, named in a refusal once EngineArgs has them (the
# tensor-parallel and 8-bit-expert work adds these fields).
_SHRINKING_OPTIONS = {"tensor_parallel_size": "--tensor-parallel-size", "quantization": "--quantization"}


class NotEnoughMemory(UserError, MemoryError):
    """The model, with the smallest cache it can run with, does not fit the device's free memory."""


def _per_rank(n: int, tp: int) -> int:
    return -(-n // tp)


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    """Parameters one rank holds, by part (all layers together)."""

    embedding: int
    head: int  # 0 when tied to the embedding
    attention: int  # q/k/v/o, lightning qkv/gate/out projections and the lightning output norm
    norms: int  # the hidden-size RMSNorms (two per layer and the final one), replicated
    router: int  # replicated
    experts: int

    @property
    def total(self) -> int:
        return self.embedding + self.head + self.attention + self.norms + self.router + self.experts


def parameter_counts(config: ModelConfig, tp: int = 1, ep: bool = False) -> ParameterCounts:
    """Parameters on one rank of `tp` (ep: experts whole, num_local_experts/tp per rank)."""
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    h, d = config.hidden_size, config.head_dim
    heads = _per_rank(config.num_attention_heads, tp)
    kv_heads = _per_rank(config.num_key_value_heads, tp)  # 1 each once tp exceeds the KV heads: replicated
    width = heads * d
    lightning = 3 * width * h + width * h + width * h + width  # qkv, output gate, out_proj, the 8192-wide norm
    softmax = width * h + 2 * kv_heads * d * h + width * h  # q, k, v, o
    attention = len(config.linear_layers) * lightning + len(config.softmax_layers) * softmax
    e, i = config.num_local_experts, config.intermediate_size
    per_layer_experts = _per_rank(e, tp) * 3 * i * h if ep else e * 3 * _per_rank(i, tp) * h
    layers = config.num_hidden_layers
    vocab = _per_rank(config.vocab_size, tp) * h
    return ParameterCounts(embedding=vocab, head=0 if config.tie_word_embeddings else vocab, attention=attention,
                           norms=(2 * layers + 1) * h, router=layers * e * h, experts=layers * per_layer_experts)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def expert_scale_count(config: ModelConfig, tp: int = 1, ep: bool = False) -> int:
    """Per-output-channel scales of 8-bit experts on one rank (all layers): w1/w3's rows split with them under
    tensor parallelism, w2's one per hidden channel on every rank; whole experts under expert parallelism."""
    e, i, h = config.num_local_experts, config.intermediate_size, config.hidden_size
    per_layer = _per_rank(e, tp) * (2 * i + h) if ep else e * (2 * _per_rank(i, tp) + h)
    return config.num_hidden_layers * per_layer


def weight_bytes(config: ModelConfig, dtype: torch.dtype, tp: int = 1, ep: bool = False,
                 expert_bits: int | None = None, head_fp32: bool = False) -> int:
    """Weight bytes on one rank: everything in `dtype`, the experts at `expert_bits` per parameter (None: the
    dtype's; 8 for fp8/int8 experts, plus their fp32 per-channel scales, under 0.1%), the head in fp32 when
    `head_fp32` (EngineArgs.lm_head_fp32)."""
    c = parameter_counts(config, tp, ep)
    b = dtype_bytes(dtype)
    experts = c.experts * b
    if expert_bits:
        experts = -(-c.experts * expert_bits // 8) + 4 * expert_scale_count(config, tp, ep)
    return (c.total - c.experts - c.head) * b + experts + c.head * (4 if head_fp32 else b)


def cache_bytes_per_slot(config: ModelConfig, tp: int = 1) -> int:
    """One request's lightning state on one rank: every lightning layer's [heads/tp, D, D] fp32 state."""
    heads = _per_rank(config.num_attention_heads, tp)
    return len(config.linear_layers) * heads * config.head_dim * config.head_dim * STATE_DTYPE_BYTES


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, tp: int = 1) -> int:
    """KV cache bytes per token on one rank: K and V of every softmax layer's KV heads (replicated past tp = heads)."""
    kv_heads = _per_rank(config.num_key_value_heads, tp)
    return len(config.softmax_layers) * 2 * kv_heads * config.head_dim * dtype_bytes(dtype)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """What one rank needs: weights, and the cache as one lightning state slot per request plus KV by tokens."""

    weights: int
    state_slot: int
    kv_per_token: int
    block_size: int

    @property
    def kv_block(self) -> int:
        return self.kv_per_token * self.block_size

    @property
    def min_cache(self) -> int:
        """The smallest cache the engine runs with: one request's state and one KV block."""
        return self.state_slot + self.kv_block

    @property
    def needed(self) -> int:
        return self.weights + self.min_cache

    def longest_context(self, budget: int, num_seqs: int = 1) -> int | None:
        """Tokens of KV left for one request when `budget` bytes hold the weights and `num_seqs` state slots
        (whole blocks; None when the model has no softmax layer, so context costs no memory)."""
        if self.kv_per_token == 0:
            return None
        left = budget - self.weights - num_seqs * self.state_slot
        return max(0, left // self.kv_block) * self.block_size


def estimate(config: ModelConfig, dtype: torch.dtype, *, tp: int = 1, ep: bool = False,
             expert_bits: int | None = None, head_fp32: bool = False, block_size: int = 256) -> MemoryEstimate:
    return MemoryEstimate(weights=weight_bytes(config, dtype, tp, ep, expert_bits, head_fp32),
                          state_slot=cache_bytes_per_slot(config, tp),
                          kv_per_token=kv_bytes_per_token(config, dtype, tp), block_size=block_size)


def device_memory(device: torch.device | str) -> tuple[int, int] | None:
    """(free, total) bytes of the device: torch.cuda.mem_get_info on CUDA; on the CPU MemAvailable and MemTotal
    from /proc/meminfo, capped by a cgroup memory limit (a container's), else os.sysconf. None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    if device.type != "cpu":
        return None
    free = total = None
    try:
        with open("/proc/meminfo") as f:
            info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f if ":" in line)}
        free, total = info.get("MemAvailable"), info.get("MemTotal")
    except (OSError, ValueError):
        pass
    if free is None:
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            free, total = os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
        except (OSError, ValueError, AttributeError):
            return None
    limit = _cgroup_limit()
    if limit is not None and limit < total:
        free, total = min(free, limit), limit
    return free, total


def _cgroup_limit() -> int | None:
    """This process's cgroup memory limit (v2 memory.max, v1 memory.limit_in_bytes), None when unlimited."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        return int(text) if text.isdigit() else None
    return None


def gb(n: float) -> str:
    """Bytes as decimal GB, to the precision a reader needs: 912 GB, 23.7 GB, 0.3 GB, 0.04 GB."""
    g = n / 1e9
    return f"{g:.0f} GB" if g >= 100 else f"{g:.1f} GB" if g >= 0.1 else f"{g:.2f} GB"


def check_fits(config: ModelConfig, name: str, dtype: torch.dtype, device: torch.device | str, *, tp: int = 1,
               ep: bool = False, expert_bits: int | None = None, head_fp32: bool = False, block_size: int = 256,
               gpu_memory_utilization: float = 1.0, options: Collection[str] = ()) -> MemoryEstimate:
    """Raise NotEnoughMemory unless `name`'s weights and its smallest cache fit the device's free memory (on CUDA
    less the (1 - gpu_memory_utilization) share of the card the engine leaves alone). `options` are the engine's
    setting names: the refusal points at those that shrink the model (tensor_parallel_size, quantization)."""
    est = estimate(config, dtype, tp=tp, ep=ep, expert_bits=expert_bits, head_fp32=head_fp32, block_size=block_size)
    mem = device_memory(device)
    if mem is None:
        logger.warning("cannot tell how much memory %s has: building %s (%s of weights) unchecked",
                       device, name, gb(est.weights))
        return est
    free, total = mem
    usable = free
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        usable = int(free - (1 - gpu_memory_utilization) * total)
    if est.needed <= usable:
        return est
    precision = _dtype_name(dtype) + (f" with {expert_bits}-bit experts" if expert_bits else "")
    where = "weights" + (f" per rank of {tp}" if tp > 1 else "")
    has = f"this device ({device}) has {gb(free)} free"
    if usable != free:
        has += f", {gb(max(usable, 0))} of it within gpu_memory_utilization={gpu_memory_utilization}"
    hints = [flag for option, flag in _SHRINKING_OPTIONS.items() if option in options]
    if dtype_bytes(dtype) > 2 and dataclasses.replace(est, weights=weight_bytes(
            config, torch.bfloat16, tp, ep, expert_bits, head_fp32)).needed <= usable:
        hints.insert(0, "--dtype bfloat16")  # it would fit in half the bytes
    hint = f"; see {' / '.join(hints)}" if hints else "; use a device with more memory"
    raise NotEnoughMemory(f"{name} needs {gb(est.weights)} in {precision} ({where}) + {gb(est.min_cache)} "
                          f"(one request's cache); {has}{hint}")


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
