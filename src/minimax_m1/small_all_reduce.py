"""The decode step's small all-reduces (about 230 a step in the full model, 12 KB to a few MB each) over PyTorch
symmetric memory (torch.distributed._symmetric_memory): every rank's buffer is mapped into every other rank's
address space, and one kernel reduces straight out of the peers' buffers.

- one-shot: each rank reads all N buffers and sums them (one round trip: the smallest messages);
- two-shot: each rank reduces 1/N of the message and the ranks then gather the parts (half the traffic per
  rank: larger messages).
Never the multimem variants (NVLink multicast, NVLS): TORCH_SYMM_MEM_DISABLE_MULTICAST=1 is set in every process
(distributed.MULTI_GPU_ENV) and only the one-shot/two-shot ops are called. A message these cannot take (too
large, not CUDA, an odd size or dtype) goes to NCCL. The kernels are CUDA-graph safe: the decode graphs capture
them with the rest of the step.

`install(group, mode, ...)` on every rank (a collective: the buffers are exchanged) makes Group.all_reduce use
it through distributed.small_all_reduce; mode "nccl" installs nothing, so both can be measured
(benchmarks/bench_all_reduce.py)."""
from __future__ import annotations

import logging

import torch

from . import distributed
from .distributed import Group

logger = logging.getLogger(__name__)

MAX_BYTES = 8 << 20  # per dtype: a batch-256 decode message of 6144 bf16 features is 3 MiB
ONE_SHOT_MAX_BYTES = 256 << 10  # above this two-shot moves less (tune with benchmarks/bench_all_reduce.py)
ALIGN_BYTES = 16  # the kernels' vector width


class SymmMemAllReduce:
    """In-place sum over `group` for CUDA tensors of the given dtypes up to MAX_BYTES, through one symmetric
    buffer per dtype."""

    def __init__(self, group: Group, device: torch.device, dtypes, max_bytes: int = MAX_BYTES,
                 one_shot_max_bytes: int = ONE_SHOT_MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.process_group.group_name
        self.one_shot_max_bytes, self.max_bytes = one_shot_max_bytes, max_bytes
        self.buffers: dict[torch.dtype, torch.Tensor] = {}
        for dtype in sorted(set(dtypes), key=str):  # the same order on every rank: rendezvous is a collective
            elem = torch.empty((), dtype=dtype).element_size()
            buf = symm_mem.empty(max_bytes // elem, dtype=dtype, device=device)
            symm_mem.rendezvous(buf, self.group_name)
            self.buffers[dtype] = buf
        self.calls = {"one_shot": 0, "two_shot": 0, "nccl": 0}  # how each message went (counted eagerly only)

    def __call__(self, x: torch.Tensor) -> bool:
        buf = self.buffers.get(x.dtype)
        nbytes = x.numel() * x.element_size()
        if buf is None or not x.is_cuda or not x.is_contiguous() or nbytes > self.max_bytes or nbytes % ALIGN_BYTES:
            self.calls["nccl"] += 1
            return False
        flat, staged = x.view(-1), buf[:x.numel()]
        staged.copy_(flat)
        if nbytes <= self.one_shot_max_bytes:
            torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, flat)
            self.calls["one_shot"] += 1
        else:
            torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", self.group_name)
            flat.copy_(staged)
            self.calls["two_shot"] += 1
        return True


def install(group: Group, mode: str, device: torch.device, dtypes) -> SymmMemAllReduce | None:
    """On every rank of `group`, in the same order. mode "nccl": nothing (NCCL takes every message); "auto":
    symmetric memory where it can be set up (CUDA, NCCL group, the ops present), else NCCL with a log line;
    "symm_mem": symmetric memory or an error."""
    distributed.set_small_all_reduce(None)
    if mode == "nccl" or not group.communicates:
        return None
    why = _why_not(group, device)
    if why is None:
        try:
            reducer = SymmMemAllReduce(group, device, dtypes)
        except Exception as e:  # noqa: BLE001 - a driver or build without peer mapping: NCCL does it all
            why = f"setting up symmetric memory failed ({type(e).__name__}: {e})"
    if why is not None:
        if mode == "symm_mem":
            raise RuntimeError(f"--all-reduce symm_mem: {why}; use --all-reduce nccl")
        if group.rank == 0:
            logger.info("small all-reduces go to NCCL: %s", why)
        return None
    distributed.set_small_all_reduce(reducer)
    if group.rank == 0:
        logger.info("small all-reduces (<= %d KiB) use symmetric memory: one-shot up to %d KiB, then two-shot",
                    reducer.max_bytes >> 10, reducer.one_shot_max_bytes >> 10)
    return reducer


def _why_not(group: Group, device: torch.device) -> str | None:
    if device.type != "cuda":
        return "not on CUDA"
    if torch.distributed.get_backend(group.process_group) != "nccl":
        return "the process group is not NCCL"
    if not hasattr(torch.ops, "symm_mem") or not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out"):
        return f"this torch ({torch.__version__}) has no symmetric-memory all-reduce"
    return None
