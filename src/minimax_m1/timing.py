"""CUDA timing and the card's measured limits, for the benchmarks (`minimax-m1 bench`, benchmarks/*.py)."""
from __future__ import annotations

import torch


def time_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn over reps, timed with CUDA events after warm-up calls (wall clock without CUDA:
    the CPU runs of the benchmarks, which check that they work, not how fast)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        import time

        walls = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            walls.append((time.perf_counter() - t0) * 1e3)
        return sorted(walls)[len(walls) // 2]
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def capture_graph(step):
    """(graph, what step returned during capture): `step` warmed up once on a side stream (library loads and
    first launches stay out of the graph), then captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def graph_time_ms(step, reps: int = 20) -> float:
    """Median milliseconds of `step` replayed from a CUDA graph (capture_graph)."""
    graph, _ = capture_graph(step)
    return time_ms(graph.replay, reps)


def copy_bandwidth(device="cuda") -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read and written (1 GiB copied, 2 GiB counted)."""
    buffers = torch.empty(2, 1 << 30, dtype=torch.uint8, device=device).random_()
    return 2 * (1 << 30) / (time_ms(lambda: buffers[1].copy_(buffers[0]), 10) / 1e3)


def gemm_rate(device="cuda") -> float:
    """bf16 GEMM rate in FLOP/s at 8192^3, on random data."""
    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device=device) for _ in range(2))
    return 2 * 8192**3 / (time_ms(lambda: a @ b, 10) / 1e3)


def measure_card(device) -> tuple[float, float]:
    """(copy bandwidth in bytes/s, bf16 GEMM FLOP/s): the ceilings every number is compared with."""
    return copy_bandwidth(device), gemm_rate(device)
