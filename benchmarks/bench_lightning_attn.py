"""Lightning-attention CUDA kernels: time, achieved rate and fraction of the card's measured limits.

    python benchmarks/bench_lightning_attn.py [--quick] [--seg-len N] [--sweep]

Limits are measured in this process: an 8192^3 bf16 matmul (TFLOP/s) and a 1 GiB device-to-device copy
(GB/s, bytes read + written). FLOPs counted per token and head: 131072 = 2*128*128 for the causal half
of the intra-block products at block 256 (q.k and p.v) + 2*128*128 for q S + 2*128*128 for k^T v (the
nominal count of the blocked algorithm, head_dim 128); bytes: q, k, v read and o written once, plus each
sequence's state read and written. Decode bytes: the fp32 state read and written (q, k, v, o are <0.2%).
Prefill is timed three ways: one synchronised eager call (the wrapper's host time exposed), eager calls back to back
(per call; the host enqueues ahead as in a model's forward: rates and bars use this) and CUDA graph replay.
Decode runs inside a CUDA graph of >= 10 steps on distinct state pools (as a model's layers would; together
at least 256 MiB, so the L2 does not hold them), time per step.
"""
import argparse

import torch
import torch.nn.functional as F

from minimax_m1.timing import graph_time_ms, measure_card, time_ms
from minimax_m1.config import lightning_slopes
from minimax_m1.ops.lightning_attn import cuda as la_cuda

FLOP_PER_TOKEN_HEAD = 131072
BACK_TO_BACK = 10  # eager calls per timing: the host enqueues ahead of the GPU, as in a model's forward
# vLLM's Triton kernels (fp32 q/k/v) over 6: the bars, ms
BARS = {
    "H100": {("prefill", 64, 8192): 0.46, ("prefill", 64, 32768): 1.67, ("prefill", 8, 32768): 0.29,
             ("prefill", 8, 131072): 1.07},
    "H200": {("prefill", 64, 8192): 0.37, ("prefill", 64, 32768): 1.37, ("prefill", 8, 32768): 0.25,
             ("prefill", 8, 131072): 0.82},
}


def prefill_case(lengths, heads, dtype=torch.bfloat16, seg_len=0, dim=128):
    t = sum(lengths)
    q, k, v = (F.silu(torch.randn(t, heads, dim, device="cuda")).to(dtype) for _ in range(3))
    slopes = torch.tensor(lightning_slopes(64, 0, 80), dtype=torch.float32, device="cuda")
    slopes = slopes if heads == 64 else slopes[torch.linspace(0, 63, heads).round().long().cuda()]
    pool = torch.zeros(len(lengths), heads, dim, dim, device="cuda")
    slots = torch.arange(len(lengths), dtype=torch.int32, device="cuda")
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    def call():
        la_cuda.prefill(q, k, v, slopes, pool, slots, cu, seg_len=seg_len)

    def calls():
        for _ in range(BACK_TO_BACK):
            call()

    single_ms = time_ms(call)
    ms = time_ms(calls) / BACK_TO_BACK
    device_ms = graph_time_ms(call)
    flops = FLOP_PER_TOKEN_HEAD * t * heads
    nbytes = 4 * t * heads * dim * q.element_size() + 2 * len(lengths) * heads * dim * dim * 4
    return (single_ms, ms, device_ms), flops, nbytes


def decode_case(batch, heads=64, dim=128, same_pool=False):
    pool_bytes = batch * heads * dim * dim * 4
    layers = min(80, max(10, -(-(256 << 20) // pool_bytes)))  # states of all steps together well past the L2
    q, k, v = (F.silu(torch.randn(batch, heads, dim, device="cuda")).to(torch.bfloat16) for _ in range(3))
    slopes = torch.tensor(lightning_slopes(heads, 0, 80), dtype=torch.float32, device="cuda")
    pools = [torch.randn(batch, heads, dim, dim, device="cuda") for _ in range(1 if same_pool else layers)] * (
        layers if same_pool else 1)
    slots = torch.arange(batch, dtype=torch.int32, device="cuda")

    def step():
        for p in pools:
            la_cuda.decode(q, k, v, slopes, p, slots)

    ms = graph_time_ms(step, reps=50) / layers
    return (ms, ms, ms), 0, 2 * batch * heads * dim * dim * 4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the largest cases")
    ap.add_argument("--seg-len", type=int, default=0, help="force the prefill segment length (0: automatic)")
    ap.add_argument("--sweep", action="store_true", help="also time a few forced segment lengths")
    args = ap.parse_args()
    if not la_cuda.available():
        raise SystemExit(f"kernels not available: {la_cuda.load_error()}")
    card = torch.cuda.get_device_name()
    kind = "H200" if "H200" in card else "H100" if "H100" in card else None
    copy_bytes_s, flop_s = measure_card("cuda")
    tflops, gbs = flop_s / 1e12, copy_bytes_s / 1e9
    print(f"card: {card}; measured bf16 GEMM 8192^3: {tflops:.0f} TFLOP/s; D2D copy: {gbs:.0f} GB/s")

    rows = []

    def add(name, key, times, flops, nbytes):
        """times: (one eager call, synchronised; eager calls back to back, per call; CUDA graph replay).
        Rates and the bar use the back-to-back eager time: the wrapper's host work is paid, overlapped with
        the GPU as in a model's forward."""
        single_ms, ms, device_ms = times
        bar = BARS.get(kind, {}).get(key)
        rate = flops / ms / 1e9 if flops else 0.0
        bw = nbytes / ms / 1e6
        verdict = "" if bar is None else ("PASS" if ms <= bar else "MISS")
        rows.append((name, single_ms, ms, device_ms, rate, rate / tflops, bw, bw / gbs, bar, verdict))

    singles = [(64, 2048), (64, 8192), (64, 32768), (8, 8192), (8, 32768), (8, 131072)]
    if args.quick:
        singles = [(64, 8192), (8, 32768)]
    for heads, n in singles:
        times, fl, nb = prefill_case([n], heads, seg_len=args.seg_len)
        add(f"prefill 1x{n} H={heads}", ("prefill", heads, n), times, fl, nb)
        if args.sweep:
            for seg in (n // 2, n // 4, n // 8, n // 16):
                if seg >= 256 and 2 * heads * n // seg <= 4 * 132 * 2:
                    times, fl, nb = prefill_case([n], heads, seg_len=seg)
                    add(f"  seg_len={seg}", None, times, fl, nb)

    g = torch.Generator().manual_seed(0)
    w = torch.rand(16, generator=g) + 0.2
    lengths = (w / w.sum() * 65536).floor().long().tolist()
    lengths[-1] += 65536 - sum(lengths)
    times_v, fl, nb = prefill_case(lengths, 64, seg_len=args.seg_len)
    add(f"prefill varlen 16 seqs ({min(lengths)}..{max(lengths)}) =64K H=64", None, times_v, fl, nb)
    times_1, fl1, nb1 = prefill_case([65536], 64, seg_len=args.seg_len)
    add("prefill 1x65536 H=64 (varlen baseline)", None, times_1, fl1, nb1)
    ratio = times_1[1] / times_v[1]
    if not args.quick:
        times, fl, nb = prefill_case([8192], 64, dtype=torch.float32)
        add("prefill 1x8192 H=64 fp32 inputs", None, times, fl, nb)

    decode_ms = {}
    for batch in (1, 16, 128, 512):
        times, fl, nb = decode_case(batch)
        decode_ms[batch] = times[2]
        add(f"decode graph batch={batch} H=64", None, times, fl, nb)
    times, fl, nb = decode_case(1, same_pool=True)
    decode_ms["l2"] = times[2]
    add("decode graph batch=1 H=64, one pool (L2-resident)", None, times, fl, nb)

    print(f"\n1 call: one eager call, synchronised (host launch time exposed); ms: {BACK_TO_BACK} eager calls back to "
          "back, per call (rates and bars); graph: replayed from a CUDA graph. Decode: graph only.")
    print(f"{'case':48s} {'1 call':>8s} {'ms':>8s} {'graph':>8s} {'TFLOP/s':>8s} {'%GEMM':>6s} {'GB/s':>7s} "
          f"{'%copy':>6s} {'bar ms':>7s}")
    for name, single_ms, ms, device_ms, rate, fr, bw, fb, bar, verdict in rows:
        bar_s = f"{bar:.2f} {verdict}" if bar else ""
        print(f"{name:48s} {single_ms:8.4f} {ms:8.4f} {device_ms:8.4f} {rate:8.1f} {100 * fr:5.1f}% {bw:7.0f} "
              f"{100 * fb:5.1f}% {bar_s}")
    print(f"\nvarlen throughput / single-sequence throughput at 64K tokens: {ratio:.2f} (bar >= 0.80)")
    big = [r for r in rows if r[0].startswith("decode") and ("128" in r[0] or "512" in r[0])]
    print("decode batch>=128 fraction of copy bandwidth: " + ", ".join(f"{100 * r[7]:.1f}%" for r in big)
          + " (bar >= 90%)")
    print(f"decode batch=1: {1000 * decode_ms[1]:.2f} us per step with states beyond the L2, "
          f"{1000 * decode_ms['l2']:.2f} us with one L2-resident pool (bar <= 3.5 us); card: {card}")


if __name__ == "__main__":
    main()
