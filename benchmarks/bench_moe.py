"""MoE experts at decode batch sizes: the fused kernels (ops/moe/cuda.py), bf16 and 8-bit, against torch's
grouped GEMMs, at MiniMax-M1's full and per-rank shapes.

    python benchmarks/bench_moe.py [--shapes full,tp2,tp4,tp8,ep8] [--tokens 1,2,...] [--sweep] [--quick]

Shapes (hidden 6144, top-2): full E 32 x I 9216; tp2 / tp4 / tp8 ranks I 4608 / 2304 / 1152; ep8 rank E 4 x
I 9216. Variants: fused bf16, fused experts_int8 (W8A16), fused fp8 (W8A8); anchors torch._grouped_mm in bf16
(ops.moe.grouped_experts) and torch._scaled_grouped_mm in fp8 (rows sorted by expert, per-row e4m3
activations, both products on e4m3 tensor cores, the combine in fp32). Routing from random router logits (fp32
softmax, top-2, renormalised), the same for every variant.

Bytes of a call: the weights of the experts the batch uses, the minimum any implementation reads (bf16 3HI x 2
bytes an expert; 8-bit 3HI bytes plus its fp32 scales, 4 (2I + H)). The floor is those bytes at the card's
copy rate (minimax_m1.timing.copy_bandwidth: a 1 GiB device-to-device copy, bytes read plus written). Each
variant runs inside one CUDA graph of 4 calls alternating between two layers' weights (the L2 keeps nothing
between calls; timing.graph_time_ms); the time is per call. "%copy" = floor / time.

`--sweep` also times the fused kernels' knobs at the tp8 and full shapes (warps per gate/up CTA, tiles per
CTA, L2 prefetch distance, PDL), next to the automatic plan (printed). The compact table comes last.
"""
import argparse
import types

import torch

from minimax_m1.ops.moe import cuda as moe_cuda, grouped_experts
from minimax_m1.timing import copy_bandwidth, graph_time_ms

H, K = 6144, 2
SHAPES = {"full": (32, 9216), "tp2": (32, 4608), "tp4": (32, 2304), "tp8": (32, 1152), "ep8": (4, 9216)}
CALLS = 4
METHODS = ("bf16", "experts_int8", "fp8")


def make_layer(e, i, seed):
    """Random bf16 experts of one layer and their 8-bit versions (per-output-channel scales)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w13 = (torch.randn(e, 2 * i, H, generator=gen, device="cuda", dtype=torch.bfloat16) * H ** -0.5)
    w2 = (torch.randn(e, H, i, generator=gen, device="cuda", dtype=torch.bfloat16) * i ** -0.5)
    layer = types.SimpleNamespace(bf16=(w13, w2), quant={})
    for method, qmax in (("experts_int8", 127.0), ("fp8", 448.0)):
        qs = []
        for w in (w13, w2):
            scale = w.abs().amax(-1).float() / qmax
            t = w.float() / scale[..., None]
            q = t.round().clamp(-127, 127).to(torch.int8) if method == "experts_int8" else \
                t.clamp(-448, 448).to(torch.float8_e4m3fn)
            qs += [q, scale]
            del t
        layer.quant[method] = tuple(qs)  # w13, w13_scale, w2, w2_scale
    return layer


def routing(e, tokens, gen):
    x = torch.randn(tokens, H, generator=gen, device="cuda").to(torch.bfloat16)
    probs = torch.softmax(torch.randn(tokens, e, generator=gen, device="cuda"), dim=-1)
    weights, experts = probs.topk(K, dim=-1)
    return x, weights / weights.sum(-1, keepdim=True), experts


def expert_bytes(i, method):
    return 3 * H * i * 2 if method == "bf16" else 3 * H * i + 4 * (2 * i + H)


def per_call_ms(call):
    def step():
        for c in range(CALLS):
            call(c % 2)
    return graph_time_ms(step) / CALLS


def fused_call(layers, method, x, weights, experts, **knobs):
    if method == "bf16":
        return lambda c: moe_cuda.moe_experts(x, experts, weights, *layers[c].bf16, **knobs)
    return lambda c: moe_cuda.moe_experts_quantized(x, experts, weights, *layers[c].quant[method], method, **knobs)


def _quantize_rows(v):
    amax = v.abs().amax(-1).float()
    a = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    return (v.float() / a[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn), a


def scaled_grouped_experts(x, experts, weights, w13, s13, w2, s2):
    """The fp8 anchor: rows sorted by expert, torch._scaled_grouped_mm for both products (rowwise scales)."""
    e, inter = w13.shape[0], w2.shape[2]
    flat = experts.flatten()
    order = flat.argsort(stable=True)
    counts = torch.zeros(e, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    token_of_row = order // K
    xq, a = _quantize_rows(x[token_of_row])
    h = torch._scaled_grouped_mm(xq, w13.transpose(1, 2), a, s13, offs=offs, out_dtype=torch.bfloat16)
    act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
    aq, aa = _quantize_rows(act)
    y = torch._scaled_grouped_mm(aq, w2.transpose(1, 2), aa, s2, offs=offs, out_dtype=torch.bfloat16)
    y = y.float() * weights.flatten()[order, None]
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token_of_row, y).to(x.dtype)


def anchor_ms(layers, kind, x, weights, experts):
    """ms per call of a torch anchor, or None with the reason printed (an API this torch lacks)."""
    if kind == "grouped bf16":
        call = lambda c: grouped_experts(x, experts, weights, *layers[c].bf16)  # noqa: E731
    else:
        call = lambda c: scaled_grouped_experts(x, experts, weights, *layers[c].quant["fp8"])  # noqa: E731
    try:
        return per_call_ms(call)
    except Exception as exc:  # noqa: BLE001 - an anchor that does not run here is reported, not fatal
        print(f"  {kind}: not run ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
        return None


def sweep(layers, e, i, gbs, name):
    """The fused kernels' knobs at a few token counts: us per call (% of copy)."""
    knob_sets = [("auto", {}), ("up_warps 4", {"up_warps": 4}), ("up_warps 8", {"up_warps": 8}),
                 ("1 tile/CTA", {"up_tiles": 1, "down_tiles": 1}), ("down_tiles 2", {"down_tiles": 2}),
                 ("down_tiles 4", {"down_tiles": 4}), ("down_tiles 8", {"down_tiles": 8}),
                 ("no prefetch", {"prefetch": 0}), ("prefetch 2", {"prefetch": 2}), ("prefetch 4", {"prefetch": 4}),
                 ("no PDL", {"pdl": False}),
                 ("1 tile, no pf", {"up_tiles": 1, "down_tiles": 1, "prefetch": 0}),
                 ("up_tiles 4", {"up_tiles": 4}), ("up 1, down 8", {"up_tiles": 1, "down_tiles": 8})]
    sizes = (1, 8, 64, 128)
    gen = torch.Generator(device="cuda").manual_seed(7)
    cases = [routing(e, t, gen) for t in sizes]
    for method in METHODS:
        print(f"\nsweep {name} (E {e}, I {i}) {method}: us per call (% of copy); auto plans:")
        for t, (x, w, ex) in zip(sizes, cases):
            print(f"  T={t}: {moe_cuda.plan(t, K, e, H, i, method=None if method == 'bf16' else method)}")
        print(f"{'knobs':>16s} " + " ".join(f"{'T=' + str(t):>14s}" for t in sizes))
        for label, knobs in knob_sets:
            cells = []
            for x, w, ex in cases:
                ms = per_call_ms(fused_call(layers, method, x, w, ex, **knobs))
                floor = ex.unique().numel() * expert_bytes(i, method) / (gbs * 1e9) * 1e3
                cells.append(f"{1000 * ms:7.1f} ({100 * floor / ms:3.0f}%)")
            print(f"{label:>16s} " + " ".join(f"{c:>14s}" for c in cells), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="full,tp2,tp4,tp8,ep8")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--sweep", action="store_true", help="also time the fused kernels' knobs (tp8 and full)")
    ap.add_argument("--quick", action="store_true", help="tokens 1,8,64,128 only")
    args = ap.parse_args()
    if not moe_cuda.available():
        raise SystemExit(f"kernel not available: {moe_cuda.load_error()}")
    tokens_list = [1, 8, 64, 128] if args.quick else [int(t) for t in args.tokens.split(",")]
    gbs = copy_bandwidth() / 1e9
    print(f"card: {torch.cuda.get_device_name()}; D2D copy (read + write): {gbs:.0f} GB/s; H {H} top-{K}; CUDA graph "
          f"of {CALLS} calls over 2 layers, us per call; floor = used experts' bytes at the copy rate")
    rows = []
    max_rows = moe_cuda.limits()["max_rows"]
    for name in args.shapes.split(","):
        e, i = SHAPES[name]
        layers = [make_layer(e, i, 0), make_layer(e, i, 1)]
        gen = torch.Generator(device="cuda").manual_seed(0)
        print(f"\n{name}: E {e} I {i}")
        for tokens in tokens_list:
            x, weights, experts = routing(e, tokens, gen)
            used = experts.unique().numel()
            row = {"shape": name, "tokens": tokens, "used": used}
            for method in METHODS:
                nbytes = used * expert_bytes(i, method)
                floor_us = nbytes / (gbs * 1e9) * 1e6
                ms = per_call_ms(fused_call(layers, method, x, weights, experts)) if tokens * K <= max_rows else None
                row[method] = (nbytes, floor_us, ms)
                pct = f"{100 * floor_us / (1000 * ms):5.1f}%" if ms else "  n/a"
                print(f"  T={tokens:4d} {method:>12s}: {nbytes / 1e6:8.1f} MB floor {floor_us:8.1f} us | fused "
                      f"{1000 * ms if ms else float('nan'):8.1f} us {pct}", flush=True)
            for kind in ("grouped bf16", "scaled fp8"):
                ms = anchor_ms(layers, kind, x, weights, experts)
                row[kind] = ms
                method = "bf16" if kind == "grouped bf16" else "fp8"
                if ms:
                    print(f"  T={tokens:4d} {kind:>12s}: {1000 * ms:8.1f} us "
                          f"{100 * row[method][1] / (1000 * ms):5.1f}% of copy on {method}'s bytes", flush=True)
            rows.append(row)
        if args.sweep and name in ("tp8", "full"):
            sweep(layers, e, i, gbs, name)
        del layers
        torch.cuda.empty_cache()

    print(f"\nsummary: us per call (% of copy on the variant's expert bytes); card {torch.cuda.get_device_name()}, "
          f"copy {gbs:.0f} GB/s")
    print(f"{'shape':>5s} {'T':>4s} {'exp':>3s} | {'bf16':>14s} {'int8':>14s} {'fp8':>14s} | "
          f"{'grouped bf16':>14s} {'scaled fp8':>14s}")

    def cell(ms, floor_us):
        return f"{1000 * ms:7.1f} ({100 * floor_us / (1000 * ms):3.0f}%)" if ms else f"{'n/a':>14s}"

    for r in rows:
        fused = " ".join(f"{cell(r[m][2], r[m][1]):>14s}" for m in METHODS)
        anchors = f"{cell(r['grouped bf16'], r['bf16'][1]):>14s} {cell(r['scaled fp8'], r['fp8'][1]):>14s}"
        print(f"{r['shape']:>5s} {r['tokens']:4d} {r['used']:3d} | {fused} | {anchors}")


if __name__ == "__main__":
    main()
