"""`minimax-m1 bench`: decode and prefill speed of a real-shape MiniMax-M1 slice on one GPU, each number
next to the card's measured limits (copy bandwidth, bf16 GEMM rate), and transformers on the same weights.

With --emulate-tp N it builds exactly one rank's share of the model (all 80 layers by default: 8 heads, 1 KV head,
1152-wide experts at N=8) with collectives skipped: every number is "one rank, no communication", a measured
lower bound for the full model on N GPUs. Under --enable-expert-parallel each MoE layer's experts are those of
its busiest rank (the rank the router sends the most of this step's tokens), since every layer's all-reduce
waits for the slowest rank."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback

import torch

from .config import LINEAR, ModelConfig
from .engine.builder import EngineArgs, build_engine, rank_shapes
from .engine.scheduler import ScheduledChunk
from .engine.sequence import Sequence
from .sampling_params import SamplingParams
from .timing import measure_card, time_ms


def engine_args(a: argparse.Namespace, **overrides) -> EngineArgs:
    """The one place the command's model flags become EngineArgs (every engine here is built from it)."""
    max_len = max([a.context + 128] + a.prefill_sizes) + 1
    kw = dict(model=a.model, load_format="dummy", dtype="bfloat16" if a.device == "cuda" else "float32",
              device=a.device, max_num_seqs=max(a.batches), max_model_len=max_len,
              max_num_batched_tokens=a.max_num_batched_tokens, enforce_eager=a.enforce_eager,
              num_kv_blocks=a.num_kv_blocks, tensor_parallel_size=a.emulate_tp or 1,
              enable_expert_parallel=a.enable_expert_parallel, emulate_rank=0 if a.emulate_tp else None,
              progress=a.device == "cuda", gpu_memory_utilization=a.gpu_memory_utilization,
              quantization=a.quantization)
    return EngineArgs(**(kw | overrides))


def bench_kv_blocks(a: argparse.Namespace, block_size: int = 256) -> int:
    """KV blocks the bench needs at once: the largest decode batch at --context, or the longest prompt."""
    per_seq = -(-(a.context + 64) // block_size)
    return max(max(a.batches) * per_seq, -(-max(a.prefill_sizes + [1]) // block_size))


def max_decode_batch(cache, context: int) -> int:
    """The most requests of `context` tokens (+ 64 to grow) one rank's cache holds: state slots, KV blocks."""
    need = cache.blocks_needed(context + 64)
    return min(cache.num_slots, cache.num_blocks // need if need else cache.num_slots)


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
    names = ("w13", "w2", "w13_scale", "w2_scale")  # the scales: 8-bit experts only

    def expert_params(m):
        return [getattr(m, n) for n in names if getattr(m, n, None) is not None]

    experts = {id(t) for m in moe_layers for t in expert_params(m)}
    total = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in experts)
    total += sum(n * sum(t[0].numel() * t.element_size() for t in expert_params(m))
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
    runner = engine.runner
    cfg = rank_shapes(runner.model.config, runner.model.parallel)  # the bytes one rank reads
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
    """How many distinct experts of this rank each layer's router picks for this batch (one eager step, hooks
    on). Under expert parallelism each layer's expert map is first pointed at its busiest rank's experts for
    this step (so the timed steps after it do that rank's work: the one every layer's all-reduce waits for)."""
    counts = []

    def hook(m, inp):
        experts = m.route(inp[0])[1]
        if m.expert_map is not None:  # expert parallel: E/N whole experts a rank
            per_rank = m.num_experts
            load = torch.bincount(experts.flatten() // per_rank, minlength=m.global_experts // per_rank)
            busiest = int(load.argmax())
            new = torch.full_like(m.expert_map, -1)
            new[busiest * per_rank:(busiest + 1) * per_rank] = torch.arange(per_rank, device=new.device)
            m.expert_map.copy_(new)  # in place: the captured graphs read this tensor
            experts = experts[(experts // per_rank) == busiest]
        counts.append(int(experts.unique().numel()))

    hooks = [layer.block_sparse_moe.register_forward_pre_hook(hook) for layer in engine.runner.model.model.layers]
    graphs, engine.runner.graphs = engine.runner.graphs, None
    try:
        engine.runner.run(chunks)
    finally:
        engine.runner.graphs = graphs
        for h in hooks:
            h.remove()
    return counts


def profile_decode(engine, batch: int, context: int, top: int = 15) -> None:
    """Kernel times of one eager decode step (torch profiler), largest first, each with its share."""
    requests = _Requests(engine, batch, context)
    graphs, engine.runner.graphs = engine.runner.graphs, None
    try:
        _print_profile(lambda: engine.runner.run(requests.rewind()), f"one eager decode step, batch {batch}", top)
    finally:
        engine.runner.graphs = graphs
        requests.release()


def profile_prefill(engine, n: int, top: int = 15) -> None:
    """Kernel times of one n-token prefill (all its chunks), largest first, each with its share."""
    _print_profile(_prefill_run(engine, n), f"one {n}-token prefill", top)


def _print_profile(run, what: str, top: int) -> None:
    for _ in range(2):
        run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    rows = [(e.key, _device_us(e), e.count) for e in prof.key_averages()]
    rows = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])
    total = sum(us for _, us, _ in rows)
    calls = sum(n for _, _, n in rows)
    print(f"\nprofile of {what}: {total / 1e3:.2f} ms of GPU time in {calls} kernels and copies; the top {top}:")
    print(f"{'share':>6} {'ms':>7} {'calls':>6} {'us/call':>8}  kernel")
    for name, us, n in rows[:top]:
        print(f"{us / total:>6.1%} {us / 1e3:>7.3f} {n:>6} {us / n:>8.1f}  {name[:90]}")
    rest = sum(us for _, us, _ in rows[top:])
    print(f"{rest / total if total else 0:>6.1%} {rest / 1e3:>7.3f} {sum(n for *_, n in rows[top:]):>6}           "
          f"(the other {max(len(rows) - top, 0)} kinds)")


def _device_us(evt) -> float:
    """An event's own device time in microseconds (the attribute's name changed across torch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


def _prefill_run(engine, n: int):
    """A function that prefills one n-token prompt from a fresh (zeroed) state slot, in the scheduler's chunks,
    and gives its cache back."""
    cache, runner = engine.cache, engine.runner
    seq = Sequence("bench-prefill", [j % 1000 for j in range(n)], SamplingParams(max_tokens=1))

    def run():
        if not cache.allocate(seq, n):
            raise RuntimeError(f"the cache cannot hold a {n}-token prompt")
        try:
            seq.num_computed = 0
            while seq.num_computed < n:
                runner.run([ScheduledChunk(seq, min(n - seq.num_computed, engine.scheduler.token_budget))])
        finally:
            cache.release(seq)

    return run


def bench_prefill(engine, n: int) -> dict:
    runner = engine.runner
    cfg = rank_flop_shapes(runner.model)
    cuda = runner.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time_ms(_prefill_run(engine, n), 3 if n <= 32768 else 1, warmup=1 if n <= 131072 else 0) / 1e3  # 1M: a minute
    # the attention term grows linearly with the context: the n tokens average n/2 of it
    flops = n * flops_per_token(cfg, 0) + (flops_per_token(cfg, n) - flops_per_token(cfg, 0)) * n / 2
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return dict(seconds=t, tok_s=n / t, flops=flops, peak_gib=peak)


def rank_flop_shapes(model) -> ModelConfig:
    """A config whose flops_per_token is one rank's: its heads, and 1/N of the expert work (TP: I/N wide; EP:
    E/N experts, on average k/N of each token's, the same product)."""
    cfg, par = model.config, model.parallel
    n = par.tensor_parallel_size
    return dataclasses.replace(rank_shapes(cfg, par), num_local_experts=cfg.num_local_experts,
                               intermediate_size=cfg.intermediate_size // n)


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
                  progress=False, num_kv_blocks=None)
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
    p = argparse.ArgumentParser(prog="minimax-m1 bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a real-shape slice, minimax-m1:START-END (default: layers 3-7, "
                   "four lightning and one softmax, on cards of over 100 GB; layers 5-7 on smaller ones; with "
                   "--emulate-tp all 80 layers, minimax-m1)")
    p.add_argument("--emulate-tp", type=int, default=0, metavar="N",
                   help="build one rank's share of N (rank 0), collectives skipped: one rank, no communication")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="with --emulate-tp: whole experts per rank, each layer timed at its busiest rank")
    p.add_argument("--quantization", default=None, choices=["fp8", "experts_int8"],
                   help="8-bit routed experts (the dummy bf16 weights quantised at load)")
    p.add_argument("--decode-batches", default="1,8,64,256")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--prefill", default=None, help="prompt lengths (default 1024,8192,32768,131072; "
                   "8192,32768 with --emulate-tp)")
    p.add_argument("--max-num-batched-tokens", type=int, default=32768)
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV blocks to allocate (default: what the largest decode batch or prompt needs)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of the card the engine may use (more leaves room for batch 256 at rank shapes)")
    p.add_argument("--long", type=int, default=0, help="also prefill one prompt of this many tokens (e.g. 1048576)")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--profile", action="store_true", help="print where a batch-1 decode step and a prefill (the largest of at most 32K tokens) spend their time")
    p.add_argument("--precision", type=int, default=0, metavar="N",
                   help="only compare the bf16 path's logits on an N-token prompt with an fp32 run, then exit")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: only to check that the bench runs (a tiny model; no limits measured)")
    a = p.parse_args(argv)
    if a.enable_expert_parallel and not a.emulate_tp:
        p.error("--enable-expert-parallel needs --emulate-tp N")
    if a.emulate_tp < 0:
        p.error("--emulate-tp must be >= 1")
    a.batches = [int(x) for x in a.decode_batches.split(",") if x]
    if a.prefill is None:
        a.prefill = "8192,32768" if a.emulate_tp else "1024,8192,32768,131072"
    a.prefill_sizes = [int(x) for x in a.prefill.split(",") if x] + ([a.long] if a.long else [])
    if a.emulate_tp:
        a.no_transformers = True  # transformers builds whole models, not one rank's share
    if a.num_kv_blocks is None:
        a.num_kv_blocks = bench_kv_blocks(a)
    return a


def _build(a: argparse.Namespace):
    """The engine with the cache the bench needs, or (its needs not fitting) with the engine's own plan."""
    try:
        return build_engine(engine_args(a))
    except MemoryError as e:
        print(f"the cache the bench asks for ({a.num_kv_blocks} KV blocks) does not fit ({e}); using the "
              f"engine's own plan")
        return build_engine(engine_args(a, num_kv_blocks=None))


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("minimax-m1 bench: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    if a.model is None:
        big = cuda and torch.cuda.get_device_properties(dev).total_memory > 100e9
        a.model = "minimax-m1" if a.emulate_tp else "minimax-m1:3-8" if big else "minimax-m1:5-8"
    if a.precision:
        r = precision_check(a, a.precision)
        print(f"card: {name}; {a.model}, {a.precision}-token prompt, bf16 GPU path vs fp32 on the same weights: "
              f"max |dlogit| {r['max_abs']:.4f} ({r['rel']:.2e} of max |logit|), mean {r['mean_abs']:.4f}, "
              f"argmax agrees at {r['argmax_agree']:.1%} of positions, KL {r['kl']:.2e}")
        return 0
    bw, gemm = measure_card(dev) if cuda else (float("nan"), float("nan"))
    print(f"card: {name}; measured copy bandwidth {bw / 1e9:.0f} GB/s, bf16 GEMM {gemm / 1e12:.0f} TFLOP/s")
    t0 = time.time()
    engine = _build(a)
    model = engine.runner.model
    cfg = model.config
    label = ""
    if a.emulate_tp:
        label = " [one rank, no communication]"
        shapes = rank_shapes(cfg, model.parallel)
        split = (f"{shapes.num_local_experts} whole experts (each layer at its busiest rank)"
                 if a.enable_expert_parallel else f"experts {shapes.intermediate_size} wide")
        print(f"emulating rank 0 of {a.emulate_tp}{' (expert parallel)' if a.enable_expert_parallel else ''}: "
              f"{model.num_lightning_heads} lightning heads, {model.num_q_heads} softmax heads, "
              f"{model.num_kv_heads} KV head(s), {split}, vocab {model.lm_head.weight.shape[0]}; every number "
              f"below is one rank, no communication: a lower bound for the full model on {a.emulate_tp} GPUs")
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    if a.quantization:
        dtype += f", routed experts {a.quantization}"
    print(f"model: {a.model} ({cfg.num_hidden_layers} layers), dummy {dtype} weights, {weights / 1e9:.1f} GB on "
          f"this rank, built in {time.time() - t0:.0f} s; decode graphs: {engine.runner.graphs is not None}; cache: {engine.cache.num_slots} state slots, "
          f"{engine.cache.num_blocks} KV blocks of {engine.cache.block_size}")
    print(f"\ndecode, {a.context} tokens of context{label}")
    print(f"{'batch':>6} {'step ms':>9} {'host ms':>8} {'tok/s':>9} {'GB/step':>8} {'GB/s':>7} {'of copy bw':>10}  "
          f"experts/layer")
    fits = max_decode_batch(engine.cache, a.context)
    for b in a.batches:
        if b > fits:
            why = (f"{engine.cache.num_slots} state slots" if fits == engine.cache.num_slots else
                   f"{engine.cache.num_blocks} KV blocks ({engine.cache.blocks_needed(a.context + 64)} a request)")
            print(f"{b:>6} does not fit: one rank's cache holds {why}; decode stops at batch {fits}")
            if fits < 1 or fits in a.batches:
                continue
            b = fits
        r = bench_decode(engine, b, a.context)
        gbs = r["bytes"] / (r["step_ms"] / 1e3)
        print(f"{b:>6} {r['step_ms']:>9.3f} {r['host_ms']:>8.3f} {r['tok_s']:>9.0f} {r['bytes'] / 1e9:>8.2f} "
              f"{gbs / 1e9:>7.0f} {gbs / bw:>10.0%}  {_short_list(r['experts'])}")
    if a.profile and cuda:
        profile_decode(engine, 1, a.context)
    print(f"\nprefill, one prompt (chunks of {a.max_num_batched_tokens}){label}")
    print(f"{'tokens':>8} {'seconds':>9} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for n in a.prefill_sizes:
        if engine.cache.blocks_needed(n) > engine.cache.num_blocks:
            print(f"{n:>8} does not fit: one rank's cache holds {engine.cache.num_blocks * engine.cache.block_size} "
                  f"tokens of KV")
            continue
        r = bench_prefill(engine, n)
        rate = r["flops"] / r["seconds"]
        print(f"{n:>8} {r['seconds']:>9.3f} {r['tok_s']:>9.0f} {rate / 1e12:>8.0f} {rate / gemm:>6.0%} "
              f"{r['peak_gib']:>9.1f}")
    if a.profile and cuda and a.prefill_sizes:
        n = max((n for n in a.prefill_sizes if n <= 32768), default=min(a.prefill_sizes))
        if engine.cache.blocks_needed(n) <= engine.cache.num_blocks:
            profile_prefill(engine, n)
    if not a.no_transformers and cuda:
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


def _short_list(xs: list[int]) -> str:
    """Per-layer counts, run-length shortened (80 layers do not fit a line): 2x3 4 ... ."""
    if len(xs) <= 12:
        return str(xs)
    return f"min {min(xs)} mean {sum(xs) / len(xs):.1f} max {max(xs)} over {len(xs)} layers"


if __name__ == "__main__":
    raise SystemExit(main())
