"""The fused decode kernels (ops/gemv, ops/norm, ops/router, ops/rotary) against the torch paths they replace,
at MiniMax-M1's TP8 rank shapes and the full model's, for decode batches.

    python benchmarks/bench_fusions.py [--tokens 1,2,4,8,64] [--ops gemv,norm,router,rotary] [--quick]

Each case runs inside one CUDA graph of CALLS calls over rotating inputs (several weight copies where the weight
would fit in L2, so every call streams from device memory; minimax_m1.timing.graph_time_ms); times are per
call, in microseconds. Bytes: what a call must move at least (weights once; activations read and written once);
"%copy" = bytes at the card's measured copy rate over the time. The GEMV table is the one to set
ops/gemv.MAX_TOKENS from (the fused path should win at every batch it takes); likewise router.FUSED_MAX_TOKENS.
"""
import argparse

import torch
import torch.nn.functional as F

from minimax_m1.layers.rotary import PartialRotary
from minimax_m1.ops.gemv import cuda as gemv_cuda
from minimax_m1.ops.norm import cuda as norm_cuda, reference as norm_ref
from minimax_m1.ops.rotary import cuda as rotary_cuda, reference as rotary_ref
from minimax_m1.ops.router import cuda as router_cuda, reference as router_ref
from minimax_m1.timing import copy_bandwidth, graph_time_ms

CALLS = 8
L2_CLEAR = 256 << 20  # bytes of distinct weights per graph: well past the H100/H200 L2 (50-60 MB)
BF16 = torch.bfloat16
GEMV = {"tp8": {"qkv_proj": (3072, 6144), "output_gate": (1024, 6144), "out_proj": (6144, 1024),
                "q_proj": (1024, 6144), "k_proj": (128, 6144), "o_proj": (6144, 1024), "lm_head": (25008, 6144)},
        "full": {"qkv_proj": (24576, 6144), "output_gate": (8192, 6144), "out_proj": (6144, 8192),
                 "k_proj": (1024, 6144), "lm_head": (200064, 6144)}}


def per_call_us(make_call, copies: int) -> float:
    """Median per-call time of CALLS calls cycling over `copies` input sets, replayed from one CUDA graph."""
    calls = [make_call(i % copies) for i in range(CALLS)]
    return graph_time_ms(lambda: [c() for c in calls]) * 1e3 / CALLS


def row(name, shape, tokens, ref_us, fused_us, nbytes, bw):
    pct = nbytes / (fused_us * 1e-6) / bw * 100
    print(f"{name:<22} {shape:<14} {tokens:>4} {ref_us:>9.2f} {fused_us:>9.2f} {ref_us / fused_us:>7.2f}x "
          f"{nbytes / (fused_us * 1e-6) / 1e9:>8.0f} {pct:>6.1f}%")


def bench_gemv(tokens_list, bw, quick):
    for size, layers in GEMV.items():
        for name, (n, k) in layers.items():
            nbytes_w = n * k * 2
            copies = max(1, min(CALLS, -(-L2_CLEAR // nbytes_w)))
            ws = [(torch.randn(n, k, device="cuda") * k ** -0.5).to(BF16) for _ in range(copies)]
            for t in tokens_list:
                if t > gemv_cuda.limits()["max_tokens"]:
                    continue
                x = torch.randn(t, k, device="cuda").to(BF16)
                ref = per_call_us(lambda i: (lambda: F.linear(x, ws[i])), copies)
                fused = per_call_us(lambda i: (lambda: gemv_cuda.gemv(x, ws[i])), copies)
                row(f"gemv {size} {name}", f"{n}x{k}", t, ref, fused, nbytes_w + 2 * t * (n + k), bw)
            del ws
            if quick:
                break


def bench_norm(tokens_list, bw):
    for n, name in ((6144, "add_rms_norm"), (1024, "gated tp8"), (8192, "gated full")):
        w = (torch.rand(n, device="cuda") + 0.5).to(BF16)
        for t in tokens_list:
            a, b = torch.randn(CALLS, t, n, device="cuda").to(BF16), torch.randn(CALLS, t, n, device="cuda").to(BF16)
            if name == "add_rms_norm":
                ref = per_call_us(lambda i: (lambda: norm_ref.add_rms_norm(a[i], b[i], w, 1e-5, 3.55, 1.0)), CALLS)
                fused = per_call_us(lambda i: (lambda: norm_cuda.add_rms_norm(a[i], b[i], w, 1e-5, 3.55, 1.0)), CALLS)
                nbytes = 4 * t * n * 2 + n * 2
            else:
                ref = per_call_us(lambda i: (lambda: norm_ref.gated_rms_norm(a[i], b[i], w, 1e-6)), CALLS)
                fused = per_call_us(lambda i: (lambda: norm_cuda.gated_rms_norm(a[i], b[i], w, 1e-6)), CALLS)
                nbytes = 3 * t * n * 2 + n * 2
            row(name, f"{t}x{n}", t, ref, fused, nbytes, bw)


def bench_router(tokens_list, bw):
    w = (torch.randn(32, 6144, device="cuda") * 6144 ** -0.5).to(BF16)
    for t in tokens_list:
        x = torch.randn(CALLS, t, 6144, device="cuda").to(BF16)
        ref = per_call_us(lambda i: (lambda: router_ref.route(x[i], w, 2)), CALLS)
        fused = per_call_us(lambda i: (lambda: router_cuda.route(x[i], w, 2)), CALLS)
        row("router 32 experts", "32x6144", t, ref, fused, w.numel() * 2 + x[0].numel() * 2, bw)


def bench_rotary(tokens_list, bw):
    for name, hq, hkv in (("rotary+kv tp8", 8, 1), ("rotary+kv full", 64, 8)):
        rope = PartialRotary(128, 64, 1e7).cuda()
        rope.init_buffers()
        cache = torch.randn(2, 512, 256, hkv, 128, device="cuda").to(BF16)
        for t in tokens_list:
            q = torch.randn(CALLS, t, hq, 128, device="cuda").to(BF16)
            k, v = (torch.randn(CALLS, t, hkv, 128, device="cuda").to(BF16) for _ in range(2))
            cos, sin = rope.cos_sin(torch.randint(0, 1 << 20, (t,), device="cuda"))
            slots = torch.randperm(512 * 256, device="cuda")[:t]
            ref = per_call_us(lambda i: (lambda: rotary_ref.rotary_write_kv(q[i], k[i], v[i], cos, sin, cache, slots)),
                              CALLS)
            fused = per_call_us(lambda i: (lambda: rotary_cuda.rotary_write_kv(q[i], k[i], v[i], cos, sin, cache,
                                                                               slots)), CALLS)
            row(name, f"{hq}q/{hkv}kv", t, ref, fused, 2 * t * 128 * 2 * (hq + 2 * hkv) + 2 * t * 64 * 4, bw)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,2,4,8,64")
    p.add_argument("--ops", default="gemv,norm,router,rotary")
    p.add_argument("--quick", action="store_true", help="one GEMV shape per size")
    a = p.parse_args()
    tokens = [int(t) for t in a.tokens.split(",") if t]
    ops = set(a.ops.split(","))
    bw = copy_bandwidth()
    print(f"card: {torch.cuda.get_device_name()}; copy bandwidth {bw / 1e9:.0f} GB/s; times per call in us "
          f"(CUDA graph of {CALLS} calls)")
    print(f"{'op':<22} {'shape':<14} {'T':>4} {'torch us':>9} {'fused us':>9} {'speedup':>8} {'GB/s':>8} {'%copy':>7}")
    if "gemv" in ops:
        bench_gemv(tokens, bw, a.quick)
    if "norm" in ops:
        bench_norm(tokens, bw)
    if "router" in ops:
        bench_router(tokens, bw)
    if "rotary" in ops:
        bench_rotary(tokens, bw)


if __name__ == "__main__":
    main()
