"""Process groups and the collectives the parallel layers call.

A `Group` is the ranks that split one model: the tensor-parallel group (expert parallelism uses the same
ranks, as vLLM does). Its collectives are plain no-ops at world size 1, and also in EMULATION: "rank r of N
with collectives skipped", where one device builds and runs exactly rank r's share of the model to measure
it (a lower bound for N devices: no communication).

Each process of an N-rank run calls `init_distributed()` (torchrun-style environment: RANK, WORLD_SIZE,
MASTER_ADDR/MASTER_PORT, or an explicit init_method such as file://) and builds the model with
`tensor_parallel_group(parallel_config)`. NCCL on CUDA, gloo on the CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError, ParallelConfig

# Never NVLink multicast (NVLS, multimem): set in this process before any process group exists (on import and
# again in init_distributed), and so inherited by every process it starts; `multi_gpu_env(env)` sets them in
# an explicit child environment.
MULTI_GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def multi_gpu_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: os.environ, updated in place) with MULTI_GPU_ENV set."""
    env = os.environ if env is None else env
    env.update(MULTI_GPU_ENV)
    return env


multi_gpu_env()  # on import too: the model imports this module before any process group can exist


@dataclasses.dataclass(frozen=True)
class Group:
    """rank of world_size; `process_group` is the torch.distributed group the collectives run over (None when
    they are skipped: world size 1, or emulation)."""

    rank: int = 0
    world_size: int = 1
    emulated: bool = False
    process_group: Any = None

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a group of {self.world_size}")
        if self.communicates and self.process_group is None:
            raise ValueError(f"a {self.world_size}-rank group needs a process group (init_distributed first)")

    @property
    def communicates(self) -> bool:
        return self.world_size > 1 and not self.emulated

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place and in x's dtype; returns x."""
        if not self.communicates:
            return x
        if small_all_reduce(x, self):
            return x
        with _staged_for_gloo(self, x, writeback=True) as buf:
            dist.all_reduce(buf, group=self.process_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x (same shape on all), concatenated along `dim` in rank order."""
        if not self.communicates:
            return x
        with _staged_for_gloo(self, x.contiguous()) as buf:
            parts = [torch.empty_like(buf) for _ in range(self.world_size)]
            dist.all_gather(parts, buf, group=self.process_group)
        return torch.cat(parts, dim=dim).to(x.device)

    def gather(self, x: torch.Tensor, dim: int = -1, dst: int = 0) -> torch.Tensor | None:
        """Every rank's x concatenated along `dim` on rank `dst`, None on the others. Without communication
        (world size 1, emulation) x itself, whatever the rank."""
        if not self.communicates:
            return x
        with _staged_for_gloo(self, x.contiguous()) as buf:
            parts = [torch.empty_like(buf) for _ in range(self.world_size)] if self.rank == dst else None
            dist.gather(buf, parts, dst=dist.get_global_rank(self.process_group, dst), group=self.process_group)
        return torch.cat(parts, dim=dim).to(x.device) if parts is not None else None


SINGLE = Group()


def emulated(rank: int, world_size: int) -> Group:
    """Rank `rank` of `world_size` with every collective skipped (the model builds and runs that rank's share)."""
    return Group(rank, world_size, emulated=True)


_small_all_reduce = None  # the installed reducer (small_all_reduce.SymmMemAllReduce), None: NCCL/gloo for all


def set_small_all_reduce(reducer) -> None:
    """reducer(x) -> bool sums x in place over this process's group and says whether it did (None: none)."""
    global _small_all_reduce
    _small_all_reduce = reducer


def small_all_reduce(x: torch.Tensor, group: Group) -> bool:
    """The hook for small decode-step messages (about 230 all-reduces per step in the full model): PyTorch's
    symmetric-memory one-shot/two-shot all-reduce (small_all_reduce.py, multicast disabled by MULTI_GPU_ENV),
    once installed on every rank; True when it reduced x in place, False for NCCL (or gloo) to do it."""
    return _small_all_reduce is not None and _small_all_reduce(x)


@contextlib.contextmanager
def _staged_for_gloo(group: Group, x: torch.Tensor, writeback: bool = False):
    """gloo reduces CUDA tensors but gathers only host ones: stage a CUDA tensor through the host for gloo (the
    one-GPU, several-rank tests), copying the result back when `writeback`; any other tensor is used in place."""
    if not (x.is_cuda and dist.get_backend(group.process_group) == "gloo"):
        yield x
        return
    buf = x.cpu()
    yield buf
    if writeback:
        x.copy_(buf)


def init_distributed(rank: int | None = None, world_size: int | None = None, backend: str | None = None,
                     init_method: str | None = None, timeout_s: float = 300.0) -> Group:
    """Join (once per process) the default process group and return it as a Group. rank/world_size default to
    $RANK/$WORLD_SIZE, init_method to "env://" ($MASTER_ADDR/$MASTER_PORT, as torchrun sets them); backend
    to nccl when CUDA is available (this process's GPU: $LOCAL_RANK, else rank) and gloo otherwise. A
    collective that waits longer than timeout_s raises instead of hanging."""
    multi_gpu_env()
    rank = _env_int("RANK") if rank is None else rank
    world_size = _env_int("WORLD_SIZE") if world_size is None else world_size
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    elif (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise RuntimeError(f"this process already is rank {dist.get_rank()} of {dist.get_world_size()}, "
                           f"not {rank} of {world_size}")
    return Group(rank, world_size, process_group=dist.group.WORLD)


def destroy_distributed() -> None:
    set_small_all_reduce(None)
    if dist.is_initialized():
        dist.destroy_process_group()


def tensor_parallel_group(parallel: ParallelConfig) -> Group:
    """The Group a model with this ParallelConfig is built on: rank `emulate_rank` emulated, world size 1, or
    this process's place in the default process group (which must span tensor_parallel_size ranks)."""
    n = parallel.tensor_parallel_size
    if parallel.emulate_rank is not None:
        return emulated(parallel.emulate_rank, n)
    if n == 1:
        return SINGLE
    if not dist.is_initialized():
        raise ConfigError(f"tensor_parallel_size={n} needs one process per rank joined by init_distributed(), "
                          f"or emulate_rank to build one rank's share alone")
    if dist.get_world_size() != n:
        raise ConfigError(f"tensor_parallel_size={n} but the process group has {dist.get_world_size()} ranks")
    return Group(dist.get_rank(), n, process_group=dist.group.WORLD)


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        raise RuntimeError(f"${name} is not set to an integer: pass rank and world_size, or launch with "
                           f"torchrun (which sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)") from None
