"""NCCL against symmetric-memory one-shot / two-shot all-reduce (src/minimax_m1/small_all_reduce.py) at the
decode step's message sizes, eager and replayed from a CUDA graph, on N GPUs of this machine:

    python benchmarks/bench_all_reduce.py --world-size 8            # a table of microseconds per all-reduce
    python benchmarks/bench_all_reduce.py --world-size 2 --check    # integer-valued sums must be exact

No NVLink multicast: NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set before any rank starts."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.multiprocessing as mp

from minimax_m1 import distributed
from minimax_m1.distributed import MULTI_GPU_ENV
from minimax_m1.timing import capture_graph

HIDDEN = 6144  # MiniMax-M1's hidden size: a decode message is batch x 6144 bf16
BATCHES = [1, 8, 32, 64, 128, 256]


def _rank(rank: int, world: int, init: str, check: bool, reps: int) -> None:
    from minimax_m1 import small_all_reduce

    torch.cuda.set_device(rank)
    group = distributed.init_distributed(rank, world, "nccl", init, timeout_s=120)
    device = torch.device("cuda", rank)
    reducer = small_all_reduce.SymmMemAllReduce(group, device, [torch.bfloat16, torch.float32])
    ok = True
    rows = []
    for batch in BATCHES:
        for dtype in (torch.bfloat16, torch.float32):
            n = batch * HIDDEN
            x = (torch.arange(n, device=device) % 7 + rank).to(dtype)  # small integers: every sum is exact
            want = sum((torch.arange(n, device=device) % 7 + r).to(torch.float32) for r in range(world))
            y = x.clone()
            handled = reducer(y)
            if check and (not handled and n * y.element_size() <= reducer.max_bytes
                          or not torch.equal(y.float(), want)):
                ok = False
                print(f"rank {rank}: batch {batch} {dtype}: wrong sum (symmetric memory used: {handled})", flush=True)
            if check or dtype != torch.bfloat16:
                continue
            times = {}
            for name, fn in (("nccl", lambda t: torch.distributed.all_reduce(t)), ("symm_mem", reducer)):
                buf = x.clone()
                times[name] = (_eager_us(fn, buf, reps), _graph_us(fn, buf, reps))
            rows.append((batch, n * 2, times))
    if rank == 0:
        if check:
            print("all sums exact" if ok else "WRONG SUMS", flush=True)
        else:
            print(f"{world} GPUs ({torch.cuda.get_device_name(device)}), bf16 messages of batch x {HIDDEN}; "
                  f"one-shot up to {reducer.one_shot_max_bytes >> 10} KiB, then two-shot")
            print(f"{'batch':>6} {'KiB':>7} {'nccl us':>9} {'graph':>7} {'symm us':>9} {'graph':>7}")
            for batch, nbytes, t in rows:
                print(f"{batch:>6} {nbytes >> 10:>7} {t['nccl'][0]:>9.1f} {t['nccl'][1]:>7.1f} "
                      f"{t['symm_mem'][0]:>9.1f} {t['symm_mem'][1]:>7.1f}")
    torch.distributed.barrier()
    distributed.destroy_distributed()
    if check and not ok:
        sys.exit(1)


def _eager_us(fn, x, reps: int) -> float:
    for _ in range(5):
        fn(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn(x)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def _graph_us(fn, x, reps: int) -> float:
    """Per all-reduce inside one captured graph of `reps` of them (how the decode graphs run them)."""
    def step():
        for _ in range(reps):
            fn(x)

    graph, _ = capture_graph(step)  # its warm-up runs all reps once
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--world-size", type=int, default=torch.cuda.device_count())
    p.add_argument("--check", action="store_true")
    p.add_argument("--reps", type=int, default=200)
    a = p.parse_args()
    if a.world_size < 2 or a.world_size > torch.cuda.device_count():
        print(f"needs 2 to {torch.cuda.device_count()} GPUs, asked for {a.world_size}", file=sys.stderr)
        return 2
    os.environ.update(MULTI_GPU_ENV)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_rank, args=(a.world_size, f"file://{d}/rendezvous", a.check, a.reps), nprocs=a.world_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
