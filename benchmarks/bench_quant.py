"""8-bit experts (fp8, experts_int8) against bf16 on one GPU, in one run: speed and accuracy.

    python benchmarks/bench_quant.py [--model minimax-m1:3-8] [--methods fp8,experts_int8] [--skip-layer]

1. One MoE layer at MiniMax-M1's shapes (32 experts, top-2, H 6144, I 9216; uniform weights of the dummy
   loader's variance, a random router): the dispatch (`moe_experts` for bf16, `moe_experts_quantized`, i.e. the
   fused 8-bit kernel where it serves, else the torch large-batch path) timed in a CUDA graph up to 512 tokens,
   eagerly above; each time next to GB/s of the used experts' bytes (in the method's storage) and the share of
   copy bandwidth, or TFLOP/s and the share of the bf16 GEMM rate at prefill sizes. For int8 above the fused
   kernel's rows, also the dequantise-then-grouped path and the fused kernel at the same sizes where it serves
   (to place ops.moe.FUSED_MAX_ROWS). Accuracy: the layer output's relative rms and max error against fp32
   arithmetic on the float weights, for bf16 and each method.
2. The real-shape slice with dummy weights (the same seed: the 8-bit experts are the bf16 ones quantised):
   batch-1 and batch-64 decode step times at 4096 tokens of context (CUDA graphs), 32K-token prefill tokens/s,
   each against bf16 with the issue's bars (<= 0.83x, <= 0.6x, fp8 prefill >= 1.3x); then logits on a 1024-token
   prompt (max and mean |dlogit|, KL(bf16 || 8-bit), argmax agreement) and greedy agreement over 64 generated
   tokens (positions equal before the first difference, and in all).
"""
from __future__ import annotations

import argparse
import gc
import sys
import types

import torch

from minimax_m1 import LLM, SamplingParams
from minimax_m1.bench import bench_decode, bench_prefill
from minimax_m1.layers.moe import SparseMoE
from minimax_m1.ops.moe import FUSED_MAX_ROWS, moe_experts, moe_experts_quantized, reference_experts
from minimax_m1.ops.moe import cuda as moe_cuda
from minimax_m1.ops.moe import quantized as q8
from minimax_m1.timing import graph_time_ms, measure_card, time_ms

E, H, I, K = 32, 6144, 9216, 2
TOKENS = (1, 8, 64, 128, 256, 512, 2048, 8192)
BARS = {"decode b1": 0.83, "decode b64": 0.6}


def make_layer(seed: int = 0):
    cfg = types.SimpleNamespace(num_local_experts=E, hidden_size=H, intermediate_size=I, num_experts_per_tok=K)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    moe = SparseMoE(cfg)
    for p, fan_in in ((moe.gate.weight, H), (moe.w13, H), (moe.w2, I)):
        p.data = ((torch.rand(p.shape, generator=gen, device="cuda") * 2 - 1) * (3 / fan_in) ** 0.5).bfloat16()
    return moe.requires_grad_(False)


def quantize(w: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert (as the loader does), so that the fp32 temporary stays one expert's."""
    parts = [q8.quantize_weight(w[e], method) for e in range(w.shape[0])]
    return torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])


def timed(fn, tokens: int) -> float:
    return graph_time_ms(fn) if tokens <= 512 else time_ms(fn, 5)


def layer_section(bw: float, gemm: float, methods: list[str]) -> None:
    moe = make_layer()
    packed = {m: (*quantize(moe.w13, m), *quantize(moe.w2, m)) for m in methods}
    gen = torch.Generator(device="cuda").manual_seed(1)
    print(f"\n1. one MoE layer, E {E} top-{K} H {H} I {I}; fused 8-bit kernel bound: "
          f"{'yes' if hasattr(moe_cuda, 'moe_experts_quantized') else 'not in this build'}")
    print(f"{'tokens':>6} {'experts':>7} | {'path':>22} {'ms':>8} {'GB/s':>6} {'%copy':>6} {'TFLOP/s':>8} "
          f"{'%gemm':>6} {'vs bf16':>7}")
    for tokens in TOKENS:
        x = torch.randn(tokens, H, generator=gen, device="cuda").bfloat16()
        weights, experts = moe.route(x)
        used = int(experts.unique().numel())
        flops = 2 * 3 * H * I * tokens * K
        runs = [("bf16", lambda: moe_experts(x, experts, weights, moe.w13, moe.w2), 2)]
        for m in methods:
            w = packed[m]
            runs.append((m, lambda w=w, m=m: moe_experts_quantized(x, experts, weights, *w, m), 1))
            if m == "experts_int8" and tokens * K > FUSED_MAX_ROWS:
                runs.append((m + " dequant+grouped", lambda w=w, m=m: q8.dequantized_experts(
                    x, experts, weights, *w, m), 1))
                if moe_cuda.supports_quantized(x, w[0], w[2], K, m):
                    runs.append((m + " fused", lambda w=w, m=m: moe_cuda.moe_experts_quantized(
                        x, experts, weights, *w, m), 1))
        base = None
        for label, fn, nbytes in runs:
            ms = timed(fn, tokens)
            base = base or ms
            rate = used * 3 * H * I * nbytes / (ms / 1e3)
            print(f"{tokens:>6} {used:>7} | {label:>22} {ms:>8.3f} {rate / 1e9:>6.0f} {rate / bw:>6.0%} "
                  f"{flops / (ms / 1e3) / 1e12:>8.0f} {flops / (ms / 1e3) / gemm:>6.0%} {ms / base:>6.2f}x",
                  flush=True)
    x = torch.randn(256, H, generator=gen, device="cuda").bfloat16()
    weights, experts = moe.route(x)
    torch.backends.cuda.matmul.allow_tf32 = False
    exact = reference_experts(x, experts, weights, moe.w13, moe.w2).double()
    outs = {"bf16": moe_experts(x, experts, weights, moe.w13, moe.w2)}
    outs.update({m: moe_experts_quantized(x, experts, weights, *packed[m], m) for m in methods})
    print("MoE layer output against fp32 arithmetic on the float (bf16) weights, 256 tokens:")
    for label, y in outs.items():
        d = y.double() - exact
        print(f"  {label:>13}: relative rms {(d.pow(2).mean() / exact.pow(2).mean()).sqrt():.2e}, max |err| / "
              f"max |y| {d.abs().max() / exact.abs().max():.2e}")
    del moe, packed
    gc.collect()
    torch.cuda.empty_cache()


def engine(model: str, method: str | None) -> LLM:
    return LLM(model, load_format="dummy", dtype="bfloat16", quantization=method, max_num_seqs=64,
               max_model_len=32768 + 256, max_num_batched_tokens=32768, gpu_memory_utilization=0.9, progress=False)


def slice_section(model: str, methods: list[str], bw: float, gemm: float) -> None:
    print(f"\n2. {model}, dummy weights (seed 0), decode at 4096 tokens of context (CUDA graphs), prefill of "
          "32768 tokens")
    prompt = [(7 * j + 3) % 1000 for j in range(1024)]
    results = {}
    for method in [None, *methods]:
        llm = engine(model, method)
        e = llm.engine
        r = {f"decode b{b}": bench_decode(e, b, 4096) for b in (1, 64)}
        r["prefill"] = bench_prefill(e, 32768)
        r["logits"] = llm.prompt_logits(prompt).cpu()
        out = llm.generate(prompt_token_ids=[prompt[:256]], sampling_params=SamplingParams(
            max_tokens=64, temperature=0.0, ignore_eos=True), use_tqdm=False)
        r["greedy"] = list(out[0].outputs[0].token_ids)
        results[method or "bf16"] = r
        label = method or "bf16"
        for b in (1, 64):
            d = r[f"decode b{b}"]
            gbs = d["bytes"] / (d["step_ms"] / 1e3)
            print(f"  {label:>12} decode b{b:<3} {d['step_ms']:8.3f} ms ({d['bytes'] / 1e9:.2f} GB, {gbs / 1e9:.0f} "
                  f"GB/s, {gbs / bw:.0%} of copy)", flush=True)
        p = r["prefill"]
        rate = p["flops"] / p["seconds"]
        print(f"  {label:>12} prefill 32K {p['tok_s']:8.0f} tok/s ({rate / 1e12:.0f} TFLOP/s, {rate / gemm:.0%} of "
              f"the bf16 GEMM rate; peak {p['peak_gib']:.1f} GiB)", flush=True)
        del llm, e
        gc.collect()
        torch.cuda.empty_cache()
    ref = results["bf16"]
    print("\nagainst bf16 (bars from issue 11):")
    for m in methods:
        r = results[m]
        for key, bar in BARS.items():
            ratio = r[key]["step_ms"] / ref[key]["step_ms"]
            print(f"  {m:>12} {key}: {ratio:.3f}x bf16's time (bar <= {bar}): {'PASS' if ratio <= bar else 'FAIL'}")
        speed = r["prefill"]["tok_s"] / ref["prefill"]["tok_s"]
        verdict = ("PASS" if speed >= 1.3 else "FAIL") if m == "fp8" else "(no bar)"
        print(f"  {m:>12} prefill 32K: {speed:.3f}x bf16's tokens/s (bar >= 1.3 for fp8): {verdict}")
        got, want = r["logits"].double(), ref["logits"].double()
        d = got - want
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                        reduction="batchmean").item()
        agree = (got.argmax(-1) == want.argmax(-1)).double().mean().item()
        same = [a == b for a, b in zip(r["greedy"], ref["greedy"])]
        first = same.index(False) if False in same else len(same)
        print(f"  {m:>12} logits (1024-token prompt): max |d| {d.abs().max():.4f}, mean |d| {d.abs().mean():.4f} "
              f"(max |logit| {want.abs().max():.2f}), KL {kl:.2e}, argmax agrees at {agree:.1%}; greedy: "
              f"{first} of 64 tokens equal before the first difference, {sum(same)} in all")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minimax-m1:3-8")
    p.add_argument("--methods", default="fp8,experts_int8")
    p.add_argument("--skip-layer", action="store_true", help="only the slice section")
    p.add_argument("--skip-slice", action="store_true", help="only the MoE layer section")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_quant: needs a CUDA GPU", file=sys.stderr)
        return 2
    methods = [m for m in a.methods.split(",") if m]
    bw, gemm = measure_card("cuda")
    print(f"card: {torch.cuda.get_device_name()}; copy {bw / 1e9:.0f} GB/s (read + write), bf16 GEMM "
          f"{gemm / 1e12:.0f} TFLOP/s; torch {torch.__version__}; fp8 tensor cores for the large-batch path: "
          f"{q8.scaled_grouped_mm_serves(torch.bfloat16, torch.device('cuda'), H, I)}")
    if not a.skip_layer:
        layer_section(bw, gemm, methods)
    if not a.skip_slice:
        slice_section(a.model, methods, bw, gemm)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
