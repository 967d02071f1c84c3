"""MoE experts at decode batch sizes: the fused kernels (ops/moe/cuda.py) against torch._grouped_mm.

    python benchmarks/bench_moe.py [--tokens 1,2,4,...] [--sweep]

MiniMax-M1's layer: 32 experts, top-2, hidden 6144, intermediate 9216, bf16; routing from random router
logits (fp32 softmax, top-2, renormalised), the same for both paths. Bytes per call: the weights of the experts
the batch uses (3 * 6144 * 9216 * 2 bytes each), the minimum any implementation reads. Each path runs inside
one CUDA graph of 4 calls alternating between two layers' weights (the L2 keeps nothing between calls); the
time is per call. The copy rate is a 1 GiB device-to-device copy in this process, bytes read plus written.
The grouped path is ops.moe.grouped_experts (argsort, grouped GEMM, silu, grouped GEMM, index_add).

A skewed routing (a few hot experts, which need several row passes) is timed at 16, 64 and 128 tokens.
Measured on an NVIDIA H200 (copy 4185 GB/s), us per layer (GB/s of the used experts, % of copy), fused vs grouped:
1 token 187 (3632, 87%) vs 335 (48%); 8: 1356 (96%) vs 2074 (63%); 64: 2608 (97%) vs 3823 (66%);
128: 2682 (97%) vs 3865 (67%); 256: 3282 (79%) vs 3884 (67%); 512: 5152 (50%) vs 3852 (67%).
Above 128 tokens the mean rows per expert need 32-row CTAs (4 n-tiles, register-bound) or repeated passes.

`--sweep` also times the kernels' knobs (routed rows per CTA, programmatic dependent launch) at a few token
counts. (Earlier sweeps, H200: 8 warps per gate_up CTA or 32 rows per down CTA instead of 4 warps and 16
rows: equal or up to 4% slower; a third 64-element block in flight per warp: equal.)
"""
import argparse
import types

import torch

from minimax_m1.timing import copy_bandwidth, graph_time_ms
from minimax_m1.layers.moe import SparseMoE
from minimax_m1.ops.moe import cuda as moe_cuda, grouped_experts

E, H, I, K = 32, 6144, 9216, 2
CALLS = 4


def make_layer(seed):
    cfg = types.SimpleNamespace(num_local_experts=E, hidden_size=H, intermediate_size=I, num_experts_per_tok=K)
    moe = SparseMoE(cfg)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for p, fan_in in ((moe.gate.weight, H), (moe.w13, H), (moe.w2, I)):
        p.data = (torch.randn(p.shape, generator=gen, device="cuda", dtype=torch.bfloat16) * fan_in ** -0.5)
    return moe.requires_grad_(False)


def graph_ms(step):
    """ms per call of `step` (CALLS calls) replayed from one CUDA graph."""
    return graph_time_ms(step) / CALLS


def case(layers, tokens, gen, skew=0.0):
    x = torch.randn(tokens, H, generator=gen, device="cuda").to(torch.bfloat16)
    logits = torch.randn(tokens, E, generator=gen, device="cuda") + torch.linspace(skew, 0, E, device="cuda")
    probs = torch.softmax(logits, dim=-1)
    weights, experts = probs.topk(K, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    used = experts.unique().numel()
    return x, weights, experts, used


def fused_ms(layers, x, weights, experts, row_tiles=0, pdl=True):
    def step():
        for c in range(CALLS):
            m = layers[c % 2]
            moe_cuda.moe_experts(x, experts, weights, m.w13, m.w2, row_tiles=row_tiles, pdl=pdl)

    return graph_ms(step)


def grouped_ms(layers, x, weights, experts):
    def step():
        for c in range(CALLS):
            m = layers[c % 2]
            grouped_experts(x, experts, weights, m.w13, m.w2)

    return graph_ms(step)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,96,128,192,256,384,512", help="comma-separated token counts")
    ap.add_argument("--sweep", action="store_true", help="also time the kernels' tuning knobs")
    args = ap.parse_args()
    if not moe_cuda.available():
        raise SystemExit(f"kernel not available: {moe_cuda.load_error()}")
    card = torch.cuda.get_device_name()
    gbs = copy_bandwidth() / 1e9
    layers = [make_layer(0), make_layer(1)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    expert_bytes = 3 * H * I * 2
    print(f"card: {card}; D2D copy (read + write): {gbs:.0f} GB/s; E {E} top-{K} H {H} I {I} bf16, CUDA graph, "
          f"per MoE layer")
    print(f"{'tokens':>6s} {'experts':>7s} {'MB':>7s} | {'fused us':>9s} {'GB/s':>6s} {'%copy':>6s} | "
          f"{'grouped us':>10s} {'GB/s':>6s} {'%copy':>6s} | {'speedup':>7s}")
    for tokens in [int(t) for t in args.tokens.split(",")]:
        x, weights, experts, used = case(layers, tokens, gen)
        nbytes = used * expert_bytes
        f = fused_ms(layers, x, weights, experts) if tokens * K <= moe_cuda.limits()["max_rows"] else float("nan")
        g = grouped_ms(layers, x, weights, experts)
        fb, gb = nbytes / f / 1e6, nbytes / g / 1e6
        print(f"{tokens:6d} {used:7d} {nbytes / 1e6:7.0f} | {1000 * f:9.1f} {fb:6.0f} {100 * fb / gbs:5.1f}% | "
              f"{1000 * g:10.1f} {gb:6.0f} {100 * gb / gbs:5.1f}% | {g / f:6.2f}x", flush=True)
    # A skewed router (logit bias falling linearly by 3 over the experts): hot experts get several row passes.
    for tokens in (16, 64, 128):
        x, weights, experts, used = case(layers, tokens, gen, skew=3.0)
        nbytes = used * expert_bytes
        f, g = fused_ms(layers, x, weights, experts), grouped_ms(layers, x, weights, experts)
        hot = int(experts.flatten().bincount().max())
        print(f"skewed routing, {tokens} tokens: {used} experts, busiest has {hot} rows; fused {1000 * f:.1f} us "
              f"({nbytes / f / 1e6:.0f} GB/s), grouped {1000 * g:.1f} us ({nbytes / g / 1e6:.0f} GB/s)", flush=True)
    if args.sweep:
        knobs = [("default", 0, True), ("no PDL", 0, False), ("row_tiles 1", 1, True), ("row_tiles 2", 2, True),
                 ("row_tiles 4", 4, True)]
        sizes = (1, 16, 64, 128, 256)
        print("\nsweep: us per call (GB/s)")
        print(f"{'knobs':>20s} " + " ".join(f"{'T=' + str(t):>15s}" for t in sizes))
        cases = [case(layers, t, torch.Generator(device="cuda").manual_seed(t)) for t in sizes]
        for label, row_tiles, pdl in knobs:
            cells = []
            for x, weights, experts, used in cases:
                ms = fused_ms(layers, x, weights, experts, row_tiles, pdl)
                cells.append(f"{1000 * ms:7.1f} ({used * expert_bytes / ms / 1e6:4.0f})")
            print(f"{label:>20s} " + " ".join(f"{c:>15s}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
