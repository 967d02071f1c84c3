"""`minimax-m1 bench`: decode and prefill speed of a real-shape MiniMax-M1 slice on one GPU, each number
next to the card's measured limits (copy bandwidth, bf16 GEMM rate), and transformers on the same weights."""
from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

from .config import LINEAR, ModelConfig
from .engine.builder import EngineArgs, build_engine
from .engine.scheduler import ScheduledChunk
from .engine.sequence import Sequence
from .sampling_params import SamplingParams
from .timing import measure_card, time_ms


def engine_args(a: argparse.Namespace, **overrides) -> EngineArgs:
    """The one place the command's model flags become EngineArgs (every engine here is built from it)."""
    kw = dict(model=a.model, load_format="dummy", dtype="bfloat16", max_num_seqs=max(a.batches),
              max_model_len=max([a.context + 128] + a.prefill_sizes) + 1,
              max_num_batched_tokens=a.max_num_batched_tokens, enforce_eager=a.enforce_eager)
    return EngineArgs(**(kw | overrides))


def flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Matrix FLOPs one token costs in the slice: projections, lightning core (~131 kFLOP per head at block
    256), softmax attention over `context` earlier tokens, two experts; not the LM head."""
    h, w, kvw = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    moe = 2 * h * cfg.num_local_experts + cfg.num_experts_per_tok * 2 * 3 * h * cfg.intermediate_size
    attn = {True: 2 * h * 5 * w + 131e3 * cfg.num_attention_heads, False: 2 * h * (2 * w + 2 * kvw) + 4 * context * w}
    return sum(attn[t == LINEAR] + moe for t in cfg.attn_type_list)


def _weight_bytes(model, active_experts: list[int]) -> int:
    """Bytes of weights a decode step reads: everything but the experts and the embedding, plus the experts
    the batch uses."""
    moe_layers = [layer.block_sparse_moe for layer in model.model.layers]
    experts = {id(m.w13) for m in moe_layers} | {id(m.w2) for m in moe_layers}
    total = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in experts)
    total += sum(n * (m.w13[0].numel() + m.w2[0].numel()) * m.w13.element_size()
                 for m, n in zip(moe_layers, active_experts))
    emb = model.model.embed_tokens.weight
    return total - emb.numel() * emb.element_size()


class _Requests:
    """`batch` requests that look `context` tokens in (slots and KV blocks taken, state/KV left as found):
    `rewind()` returns chunks for the same decode step every time."""

    def __init__(self, engine, batch: int, context: int):
        self.cache, self.context = engine.cache, context
        self.seqs = [Sequence(f"bench-{i}", [(7 * i + j) % 1000 for j in range(context)], SamplingParams())
                     for i in range(batch)]
        self.chunks = [ScheduledChunk(s, 1) for s in self.seqs]
        for s in self.seqs:
            if not self.cache.allocate(s, context + 64):
                self.release()
                raise RuntimeError(f"the cache cannot hold {batch} requests of {context} tokens: lower "
                                   "--decode-batches or --context")

    def rewind(self) -> list[ScheduledChunk]:
        for s in self.seqs:
            s.num_computed = self.context - 1
        return self.chunks

    def release(self) -> None:
        for s in self.seqs:
            self.cache.release(s)


def bench_decode(engine, batch: int, context: int, reps: int = 20) -> dict:
    runner, cfg = engine.runner, engine.runner.model.config
    requests = _Requests(engine, batch, context)
    try:
        active = _active_experts(engine, requests.rewind())
        host = []

        def step():
            chunks = requests.rewind()
            t0 = time.perf_counter()
            runner.run(chunks)  # returns once the step is queued: this is the host's share
            host.append(time.perf_counter() - t0)

        t = time_ms(step, reps) / 1e3
    finally:
        requests.release()
    state = batch * len(cfg.linear_layers) * cfg.num_attention_heads * cfg.head_dim**2 * 4 * 2  # read + write
    kv = batch * context * len(cfg.softmax_layers) * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    weights = _weight_bytes(runner.model, active)
    return dict(step_ms=t * 1e3, host_ms=sorted(host)[len(host) // 2] * 1e3, tok_s=batch / t,
                bytes=weights + state + kv, experts=active)


@torch.inference_mode()
def _active_experts(engine, chunks) -> list[int]:
    """How many distinct experts each layer's router picks for this batch (one eager step, hooks on)."""
    counts = []
    hooks = [layer.block_sparse_moe.register_forward_hook(
        lambda m, inp, out: counts.append(int(m.route(inp[0])[1].unique().numel())))
        for layer in engine.runner.model.model.layers]
    graphs, engine.runner.graphs = engine.runner.graphs, None
    try:
        engine.runner.run(chunks)
    finally:
        engine.runner.graphs = graphs
        for h in hooks:
            h.remove()
    return counts


def profile_decode(engine, batch: int, context: int) -> None:
    """Kernel times of one eager decode step (torch profiler), largest first."""
    requests = _Requests(engine, batch, context)
    graphs, engine.runner.graphs = engine.runner.graphs, None
    try:
        for _ in range(3):
            engine.runner.run(requests.rewind())
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine.runner.run(requests.rewind())
            torch.cuda.synchronize()
    finally:
        engine.runner.graphs = graphs
        requests.release()
    print(f"\nprofile of one eager decode step, batch {batch}:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


def bench_prefill(engine, n: int) -> dict:
    cfg, cache, runner = engine.runner.model.config, engine.cache, engine.runner
    seq = Sequence("bench-prefill", [j % 1000 for j in range(n)], SamplingParams(max_tokens=1))
    torch.cuda.reset_peak_memory_stats()

    def run():
        cache.release(seq)  # each pass starts from a fresh (zeroed) state slot
        if not cache.allocate(seq, n):
            raise RuntimeError(f"the cache cannot hold a {n}-token prompt")
        seq.num_computed = 0
        while seq.num_computed < n:
            runner.run([ScheduledChunk(seq, min(n - seq.num_computed, engine.scheduler.token_budget))])

    try:
        t = time_ms(run, 3 if n <= 32768 else 1, warmup=1 if n <= 131072 else 0) / 1e3  # a 1M prompt: a minute
    finally:
        cache.release(seq)
    # the attention term grows linearly with the context: the n tokens average n/2 of it
    flops = n * flops_per_token(cfg, 0) + (flops_per_token(cfg, n) - flops_per_token(cfg, 0)) * n / 2
    return dict(seconds=t, tok_s=n / t, flops=flops, peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def bench_transformers(engine, context: int, steps: int = 3) -> dict | None:
    """transformers' MiniMaxForCausalLM (eager, bf16) on the same weights (shared, not copied): batch-1
    decode step time after a `context`-token prefill."""
    try:
        from .transformers_twin import transformers_twin

        hf = transformers_twin(engine.runner.model)
    except ImportError:
        return None
    ids = torch.randint(0, 1000, (1, context), device=engine.runner.device)
    with torch.inference_mode():
        out = hf(ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

        def step():
            nonlocal cache
            cache = hf(nxt, past_key_values=cache, use_cache=True).past_key_values

        t = time_ms(step, steps, warmup=1) / 1e3
    return dict(step_ms=t * 1e3, tok_s=1 / t)


def precision_check(a: argparse.Namespace, n: int) -> dict:
    """Distance of the bf16 GPU path's logits from an fp32 run on the same (bf16-valued) weights and the
    same n-token prompt: the precision the serving path gives up."""
    common = dict(max_num_seqs=2, max_num_batched_tokens=2048, max_model_len=n + 1, enforce_eager=True,
                  progress=False)
    low = build_engine(engine_args(a, dtype="bfloat16", gpu_memory_utilization=0.3, **common))
    ids = [(7 * j) % 1000 for j in range(n)]
    got = low.prompt_logits(ids).cpu()
    high = build_engine(engine_args(a, dtype="float32", gpu_memory_utilization=0.97, **common))
    with torch.no_grad():
        for p32, p16 in zip(high.runner.model.parameters(), low.runner.model.parameters(), strict=True):
            p32.copy_(p16)
    del low
    ref = high.prompt_logits(ids).cpu()
    diff = (got - ref).abs()
    return dict(max_abs=diff.max().item(), rel=(diff.max() / ref.abs().max()).item(),
                mean_abs=diff.mean().item(), argmax_agree=(got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                kl=torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                              reduction="batchmean").item())


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="minimax-m1 bench", description=__doc__)
    p.add_argument("--model", default=None, help="a real-shape slice, minimax-m1:START-END (default: layers 3-7, "
                   "four lightning and one softmax, on cards of over 100 GB; layers 5-7 on smaller ones)")
    p.add_argument("--decode-batches", default="1,8,64,256")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--prefill", default="1024,8192,32768,131072")
    p.add_argument("--max-num-batched-tokens", type=int, default=32768)
    p.add_argument("--long", type=int, default=0, help="also prefill one prompt of this many tokens (e.g. 1048576)")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--profile", action="store_true", help="print where a batch-1 decode step spends its time")
    p.add_argument("--precision", type=int, default=0, metavar="N",
                   help="only compare the bf16 path's logits on an N-token prompt with an fp32 run, then exit")
    a = p.parse_args(argv)
    a.batches = [int(x) for x in a.decode_batches.split(",") if x]
    a.prefill_sizes = [int(x) for x in a.prefill.split(",") if x] + ([a.long] if a.long else [])
    return a


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    if not torch.cuda.is_available():
        print("minimax-m1 bench: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    if a.model is None:
        a.model = "minimax-m1:3-8" if torch.cuda.get_device_properties(dev).total_memory > 100e9 else "minimax-m1:5-8"
    if a.precision:
        r = precision_check(a, a.precision)
        print(f"card: {name}; {a.model}, {a.precision}-token prompt, bf16 GPU path vs fp32 on the same weights: "
              f"max |dlogit| {r['max_abs']:.4f} ({r['rel']:.2e} of max |logit|), mean {r['mean_abs']:.4f}, "
              f"argmax agrees at {r['argmax_agree']:.1%} of positions, KL {r['kl']:.2e}")
        return 0
    bw, gemm = measure_card(dev)
    print(f"card: {name}; measured copy bandwidth {bw / 1e9:.0f} GB/s, bf16 GEMM {gemm / 1e12:.0f} TFLOP/s")
    t0 = time.time()
    engine = build_engine(engine_args(a))
    cfg = engine.runner.model.config
    print(f"model: {a.model} ({cfg.num_hidden_layers} layers, types {cfg.attn_type_list}), dummy bf16 weights, "
          f"built in {time.time() - t0:.0f} s; decode graphs: {engine.runner.graphs is not None}")
    print(f"\ndecode, {a.context} tokens of context")
    print(f"{'batch':>6} {'step ms':>9} {'host ms':>8} {'tok/s':>9} {'GB/step':>8} {'GB/s':>7} {'of copy bw':>10}  "
          f"experts/layer")
    for b in a.batches:
        r = bench_decode(engine, b, a.context)
        gbs = r["bytes"] / (r["step_ms"] / 1e3)
        print(f"{b:>6} {r['step_ms']:>9.3f} {r['host_ms']:>8.3f} {r['tok_s']:>9.0f} {r['bytes'] / 1e9:>8.2f} "
              f"{gbs / 1e9:>7.0f} {gbs / bw:>10.0%}  {r['experts']}")
    if a.profile:
        profile_decode(engine, 1, a.context)
    print(f"\nprefill, one prompt (chunks of {a.max_num_batched_tokens})")
    print(f"{'tokens':>8} {'seconds':>9} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for n in a.prefill_sizes:
        r = bench_prefill(engine, n)
        rate = r["flops"] / r["seconds"]
        print(f"{n:>8} {r['seconds']:>9.3f} {r['tok_s']:>9.0f} {rate / 1e12:>8.0f} {rate / gemm:>6.0%} "
              f"{r['peak_gib']:>9.1f}")
    if not a.no_transformers:
        print("\ntransformers MiniMaxForCausalLM, eager bf16, same weights, batch-1 decode")
        try:
            r = bench_transformers(engine, a.context)
            ours = bench_decode(engine, 1, a.context)
            if r:
                print(f"transformers {r['step_ms']:.1f} ms/step ({r['tok_s']:.1f} tok/s); minimax-m1 "
                      f"{ours['step_ms']:.2f} ms/step ({ours['tok_s']:.0f} tok/s): {ours['tok_s'] / r['tok_s']:.0f}x")
        except Exception:  # the comparison is a side show: report, do not fail the bench
            print("transformers comparison failed:\n" + "".join(traceback.format_exc().splitlines(True)[-12:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
