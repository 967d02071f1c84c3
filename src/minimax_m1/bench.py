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
from .engine.scheduler import ScheduledChunk, release_caches, take_caches
from .engine.sequence import Sequence
from .sampling_params import SamplingParams


def time_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn over reps, timed with CUDA events after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graph_time_ms(step, reps: int = 20) -> float:
    """Median milliseconds of `step` replayed from a CUDA graph (warmed up on a side stream, then captured)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
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


def _time(fn, reps: int, warmup: int = 3) -> float:
    return time_ms(fn, reps, warmup) / 1e3


def flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Matrix FLOPs one token costs in the slice: projections, lightning core (~131 kFLOP per head at block
    256), softmax attention over `context` earlier tokens, two experts; not the LM head."""
    h, w, kvw = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    moe = 2 * h * cfg.num_local_experts + cfg.num_experts_per_tok * 2 * 3 * h * cfg.intermediate_size
    total = 0.0
    for t in cfg.attn_type_list:
        if t == LINEAR:
            total += 2 * h * 5 * w + 131e3 * cfg.num_attention_heads
        else:
            total += 2 * h * (2 * w + 2 * kvw) + 4 * context * w
        total += moe
    return total


def _weight_bytes(model, active_experts: list[int]) -> int:
    """Bytes of weights a decode step reads: everything but the experts, plus the experts the batch uses."""
    total = 0
    moe_layers = [layer.block_sparse_moe for layer in model.model.layers]
    expert_params = {id(m.w13) for m in moe_layers} | {id(m.w2) for m in moe_layers}
    for p in model.parameters():
        if id(p) not in expert_params:
            total += p.numel() * p.element_size()
    for m, n in zip(moe_layers, active_experts):
        total += n * (m.w13[0].numel() + m.w2[0].numel()) * m.w13.element_size()
    return total - model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()


def _fake_running(engine, batch: int, context: int) -> list[Sequence]:
    """`batch` requests that look `context` tokens in (slots and KV blocks taken, state/KV left random)."""
    sched = engine.scheduler
    seqs = []
    for i in range(batch):
        seq = Sequence(f"bench-{i}", None, [(7 * i + j) % 1000 for j in range(context)],
                       SamplingParams(max_tokens=1 << 30, temperature=0, ignore_eos=True), None, engine.runner.device)
        take_caches(seq, sched.state_pool, sched.kv_cache, sched.kv_cache.blocks_needed(context + 64))
        seq.num_computed = context - 1
        seqs.append(seq)
    return seqs


def _release(engine, seqs) -> None:
    for s in seqs:
        release_caches(s, engine.scheduler.state_pool, engine.scheduler.kv_cache)


def bench_decode(engine, batch: int, context: int, reps: int = 20) -> dict:
    runner, model, cfg = engine.runner, engine.runner.model, engine.runner.model.config
    seqs = _fake_running(engine, batch, context)
    chunks = [ScheduledChunk(s, 1) for s in seqs]
    active = _active_experts(engine, chunks)

    host = []

    def step():
        for s in seqs:
            s.num_computed = context - 1  # the same context every step
        t0 = time.perf_counter()
        runner.run(chunks)  # returns once the step is queued: this is the host's share
        host.append(time.perf_counter() - t0)

    t = _time(step, reps)
    _release(engine, seqs)
    n_lin, n_sm = len(cfg.linear_layers), len(cfg.softmax_layers)
    state = batch * n_lin * cfg.num_attention_heads * cfg.head_dim**2 * 4 * 2  # read + write
    kv = batch * context * n_sm * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    weights = _weight_bytes(model, active)
    return dict(batch=batch, step_ms=t * 1e3, host_ms=sorted(host)[len(host) // 2] * 1e3, tok_s=batch / t,
                bytes=weights + state + kv,
                weights=weights, state=state, kv=kv, experts=active, graph=runner.graphs is not None)


@torch.inference_mode()
def _active_experts(engine, chunks) -> list[int]:
    """How many distinct experts each layer's router picks for this batch (one eager step, hooks on)."""
    counts, hooks = [], []
    for layer in engine.runner.model.model.layers:
        moe = layer.block_sparse_moe
        hooks.append(moe.register_forward_hook(
            lambda m, inp, out: counts.append(int(m.route(inp[0])[1].unique().numel()))))
    graphs, engine.runner.graphs = engine.runner.graphs, None
    saved = [c.seq.num_computed for c in chunks]
    try:
        engine.runner.run(chunks)
    finally:
        engine.runner.graphs = graphs
        for c, n in zip(chunks, saved):
            c.seq.num_computed = n
        for h in hooks:
            h.remove()
    return counts


def profile_decode(engine, batch: int, context: int) -> None:
    """Kernel times of one eager decode step (torch profiler), largest first."""
    seqs = _fake_running(engine, batch, context)
    chunks = [ScheduledChunk(s, 1) for s in seqs]
    graphs, engine.runner.graphs = engine.runner.graphs, None
    try:
        for _ in range(3):
            for s in seqs:
                s.num_computed = context - 1
            engine.runner.run(chunks)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for s in seqs:
                s.num_computed = context - 1
            engine.runner.run(chunks)
            torch.cuda.synchronize()
    finally:
        engine.runner.graphs = graphs
        _release(engine, seqs)
    print(f"\nprofile of one eager decode step, batch {batch}:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


def bench_prefill(engine, n: int) -> dict:
    cfg, sched, runner = engine.runner.model.config, engine.scheduler, engine.runner
    seq = Sequence("bench-prefill", None, [j % 1000 for j in range(n)], SamplingParams(max_tokens=1), None,
                   runner.device)
    take_caches(seq, sched.state_pool, sched.kv_cache, sched.kv_cache.blocks_needed(n))
    torch.cuda.reset_peak_memory_stats()

    def run():
        seq.num_computed = 0
        sched.state_pool.states[:, seq.state_slot].zero_()
        while seq.num_computed < n:
            runner.run([ScheduledChunk(seq, min(n - seq.num_computed, sched.token_budget))])

    reps = 3 if n <= 32768 else 1
    t = _time(run, reps, warmup=1 if n <= 131072 else 0)  # one pass of a 1M prompt is a minute
    peak = torch.cuda.max_memory_allocated()
    _release(engine, [seq])
    # the attention term grows linearly with the context: the n tokens average n/2 of it
    flops = n * flops_per_token(cfg, 0) + (flops_per_token(cfg, n) - flops_per_token(cfg, 0)) * n / 2
    return dict(n=n, seconds=t, tok_s=n / t, flops=flops, peak_gib=peak / 2**30)


def transformers_twin(model):
    """transformers' MiniMaxForCausalLM holding this model's parameters (shared, not copied), with the
    authors' decay rates. Faithful only where rotary covers the whole head (transformers ignores rotary_dim)."""
    import transformers

    cfg = model.config
    hf_cfg = transformers.MiniMaxConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, num_local_experts=cfg.num_local_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, rms_norm_eps=cfg.rms_norm_eps,
        layer_types=["linear_attention" if t == LINEAR else "full_attention" for t in cfg.attn_type_list],
        full_attn_alpha_factor=cfg.full_attn_alpha, full_attn_beta_factor=cfg.full_attn_beta,
        linear_attn_alpha_factor=cfg.linear_attn_alpha, linear_attn_beta_factor=cfg.linear_attn_beta,
        mlp_alpha_factor=cfg.mlp_alpha, mlp_beta_factor=cfg.mlp_beta,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"})
    with torch.device("meta"):
        hf = transformers.MiniMaxForCausalLM(hf_cfg)
    ours = dict(model.named_parameters())
    dev = model.lm_head.weight.device
    for name, module in hf.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None:  # e.g. nn.Linear(bias=False) registers its bias as None
                continue
            full = _our_name(f"{name}.{pname}" if name else pname)
            if full not in ours and pname == "bias":  # some transformers releases give projections a bias
                module._parameters[pname] = torch.nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=dev))
                continue
            module._parameters[pname] = ours[full]
    layers = dict(zip(hf.model.layers, model.model.layers))
    for hf_layer, our_layer in layers.items():  # derived buffers, recomputed on the device
        attn = hf_layer.self_attn
        if hasattr(attn, "get_slope_rate"):
            s = our_layer.self_attn.slopes.float().cpu()[:, None, None]  # some releases build on the CPU
            for bname, val in zip(("slope_rate", "query_decay", "key_decay", "diagonal_decay"),
                                  (s, *attn.decay_factors(s))):
                setattr(attn, bname, val.to(dev, model.lm_head.weight.dtype))  # as transformers' .to(dtype)
    rotary = hf.model.rotary_emb
    inv, _ = rotary.compute_default_rope_parameters(hf_cfg)
    rotary.inv_freq, rotary.original_inv_freq = inv.to(dev), inv.to(dev)
    return hf.eval()


def bench_transformers(engine, context: int, steps: int = 3) -> dict | None:
    """transformers' MiniMaxForCausalLM (eager, bf16) on the same weights (shared, not copied): batch-1
    decode step time after a `context`-token prefill."""
    try:
        hf = transformers_twin(engine.runner.model)
    except ImportError:
        return None
    dev = engine.runner.device
    ids = torch.randint(0, 1000, (1, context), device=dev)
    with torch.inference_mode():
        out = hf(ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

        def step():
            nonlocal cache
            cache = hf(nxt, past_key_values=cache, use_cache=True).past_key_values

        t = _time(step, steps, warmup=1)
    return dict(step_ms=t * 1e3, tok_s=1 / t)


def _our_name(hf_name: str) -> str:
    return (hf_name.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.w13")
            .replace(".mlp.experts.down_proj", ".block_sparse_moe.w2")
            .replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight"))


def precision_check(model: str, n: int) -> dict:
    """Distance of the bf16 GPU path's logits from an fp32 run on the same (bf16-valued) weights and the
    same n-token prompt: the precision the serving path gives up."""
    common = dict(model=model, load_format="dummy", max_num_seqs=2, max_num_batched_tokens=2048,
                  max_model_len=n + 1, enforce_eager=True, progress=False)
    low = build_engine(EngineArgs(dtype="bfloat16", gpu_memory_utilization=0.3, **common))
    ids = [(7 * j) % 1000 for j in range(n)]
    got = low.prompt_logits(ids).cpu()
    high = build_engine(EngineArgs(dtype="float32", gpu_memory_utilization=0.97, **common))
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


def main(argv: list[str] | None = None) -> int:
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
    if not torch.cuda.is_available():
        print("minimax-m1 bench: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    if a.model is None:
        a.model = "minimax-m1:3-8" if torch.cuda.get_device_properties(dev).total_memory > 100e9 else "minimax-m1:5-8"
    if a.precision:
        r = precision_check(a.model, a.precision)
        print(f"card: {name}; {a.model}, {a.precision}-token prompt, bf16 GPU path vs fp32 on the same weights: "
              f"max |dlogit| {r['max_abs']:.4f} ({r['rel']:.2e} of max |logit|), mean {r['mean_abs']:.4f}, "
              f"argmax agrees at {r['argmax_agree']:.1%} of positions, KL {r['kl']:.2e}")
        return 0
    bw, gemm = measure_card(dev)
    print(f"card: {name}; measured copy bandwidth {bw / 1e9:.0f} GB/s, bf16 GEMM {gemm / 1e12:.0f} TFLOP/s")
    batches = [int(x) for x in a.decode_batches.split(",") if x]
    max_len = max([a.context + 128] + [int(x) for x in a.prefill.split(",") if x] + [a.long]) + 1
    t0 = time.time()
    engine = build_engine(EngineArgs(model=a.model, load_format="dummy", dtype="bfloat16",
                                     max_num_seqs=max(batches), max_model_len=max_len,
                                     max_num_batched_tokens=a.max_num_batched_tokens, enforce_eager=a.enforce_eager))
    cfg = engine.runner.model.config
    print(f"model: {a.model} ({cfg.num_hidden_layers} layers, types {cfg.attn_type_list}), dummy bf16 weights, "
          f"built in {time.time() - t0:.0f} s; decode graphs: {engine.runner.graphs is not None}")
    print(f"\ndecode, {a.context} tokens of context")
    print(f"{'batch':>6} {'step ms':>9} {'host ms':>8} {'tok/s':>9} {'GB/step':>8} {'GB/s':>7} {'of copy bw':>10}  "
          f"experts/layer")
    for b in batches:
        r = bench_decode(engine, b, a.context)
        gbs = r["bytes"] / (r["step_ms"] / 1e3)
        print(f"{b:>6} {r['step_ms']:>9.3f} {r['host_ms']:>8.3f} {r['tok_s']:>9.0f} {r['bytes'] / 1e9:>8.2f} "
              f"{gbs / 1e9:>7.0f} "
              f"{gbs / bw:>10.0%}  {r['experts']}")
    if a.profile:
        profile_decode(engine, 1, a.context)
    print(f"\nprefill, one prompt (chunks of {a.max_num_batched_tokens})")
    print(f"{'tokens':>8} {'seconds':>9} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    sizes = [int(x) for x in a.prefill.split(",") if x] + ([a.long] if a.long else [])
    for n in sizes:
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
