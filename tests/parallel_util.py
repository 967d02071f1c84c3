"""The model without the engine, on one rank or several: build a rank's model, pack batches as
engine/model_runner.py does (ForwardBatch) with this rank's caches (Caches sized for its local heads), and
start N gloo ranks as subprocesses with a hard timeout. Run as a script, this file is one such rank."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

import minimax_m1
from minimax_m1.config import LINEAR, SOFTMAX, ModelConfig, ParallelConfig, QuantConfig
from minimax_m1.distributed import MULTI_GPU_ENV, Group, destroy_distributed, init_distributed
from minimax_m1.forward_batch import Caches, ForwardBatch
from minimax_m1.models.minimax_m1 import MiniMaxM1ForCausalLM
from minimax_m1.weights import checkpoint_shapes, init_dummy, load_checkpoint

BLOCK = 16  # KV block size: the prompts span several blocks
PROMPTS = ([(7 * i + 3) % 251 for i in range(36)] + [250], [0] + [(11 * i + 5) % 251 for i in range(19)])
CHUNKS = ([16, 16, 5], [7, 13])  # chunked prefill: tokens per step of each prompt
DECODE_STEPS = 6


def split_config(num_kv_heads: int = 4) -> ModelConfig:
    """A tiny model 4 ranks can split: 8 heads, 4 KV heads (2: replicated at 4 ranks), 8 experts of I = 64,
    vocab 251 (a padded tail at 2 and 4 ranks), a softmax layer with partial rotary between lightning layers."""
    alpha = (2 * 4) ** 0.25
    return ModelConfig(
        vocab_size=251, hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=num_kv_heads,
        head_dim=16, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2,
        attn_type_list=[LINEAR, SOFTMAX, LINEAR, LINEAR], rotary_dim=8, rope_theta=1e4, full_attn_alpha=alpha,
        linear_attn_alpha=alpha, mlp_alpha=alpha, max_position_embeddings=4096)


def gpu_config() -> ModelConfig:
    """split_config at head_dim 128 and widths the CUDA kernels serve (hidden and I/2 multiples of 64)."""
    return dataclasses.replace(split_config(2), hidden_size=256, num_attention_heads=4, head_dim=128, rotary_dim=64,
                               intermediate_size=128, num_local_experts=4)


def build(config: ModelConfig, parallel: ParallelConfig, group: Group, checkpoint=None, seed: int = 0,
          device: str = "cpu", dtype: torch.dtype = torch.float32, quantization: str | None = None):
    """This rank's model: dummy weights of `seed`, or loaded from `checkpoint`; 8-bit experts with
    `quantization` ("fp8", "experts_int8")."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MiniMaxM1ForCausalLM(config, parallel, group, quant=QuantConfig.parse(quantization))
    finally:
        torch.set_default_dtype(previous)
    if checkpoint is None:
        init_dummy(model, seed)
    else:
        load_checkpoint(model, checkpoint, progress=False)
    return model.eval()


@dataclasses.dataclass
class Seq:
    token_ids: list[int]
    slot: int
    blocks: list[int]
    num_computed: int = 0


class Runner:
    """Model steps over hand-packed batches with this rank's state slots and KV blocks."""

    def __init__(self, model, num_seqs: int, max_len: int, block_size: int = BLOCK):
        cfg, self.model, self.block_size = model.config, model, block_size
        w = model.lm_head.weight
        self.device = w.device
        self.blocks_per_seq = -(-max_len // block_size)
        self.caches = Caches(
            lightning=torch.zeros(len(cfg.linear_layers), num_seqs, model.num_lightning_heads, cfg.head_dim,
                                  cfg.head_dim, device=w.device),
            kv=torch.zeros(len(cfg.softmax_layers), 2, num_seqs * self.blocks_per_seq + 1, block_size,
                           model.num_kv_heads, cfg.head_dim, dtype=w.dtype, device=w.device))

    def seq(self, token_ids: list[int], slot: int) -> Seq:
        return Seq(list(token_ids), slot, list(range(slot * self.blocks_per_seq, (slot + 1) * self.blocks_per_seq)))

    @torch.inference_mode()
    def step(self, chunks: list[tuple[Seq, int]], all_logits: bool = False) -> torch.Tensor | None:
        """One packed step (as ModelRunner.build_batch packs it); logits of every token (all_logits) or of each
        chunk's last token, on rank 0 (None on the others)."""
        ids, positions, slot_mapping, cu, rows = [], [], [], [0], []
        for seq, n in chunks:
            start = seq.num_computed
            ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            bs = self.block_size
            slot_mapping += [seq.blocks[p // bs] * bs + p % bs for p in range(start, start + n)]
            cu.append(cu[-1] + n)
            rows += range(cu[-2], cu[-1]) if all_logits else [cu[-1] - 1]
        seq_lens = [n for _, n in chunks]
        context_lens = [s.num_computed + n for s, n in chunks]
        i32, i64 = dict(dtype=torch.int32, device=self.device), dict(dtype=torch.int64, device=self.device)
        batch = ForwardBatch(
            positions=torch.tensor(positions, **i64), cu_seqlens=torch.tensor(cu, **i32),
            state_slots=torch.tensor([s.slot for s, _ in chunks], **i32),
            block_tables=torch.tensor([s.blocks for s, _ in chunks], **i32),
            slot_mapping=torch.tensor(slot_mapping, **i64), context_lens_t=torch.tensor(context_lens, **i32),
            seq_lens=seq_lens, context_lens=context_lens, max_seqlen_q=max(seq_lens), context_len_bound=max(context_lens),
            is_decode=all(n == 1 for n in seq_lens), logits_indices=torch.tensor(rows, **i64))
        hidden = self.model(torch.tensor(ids, **i64), batch, self.caches)
        for seq, n in chunks:
            seq.num_computed += n
        return self.model.compute_logits(hidden[batch.logits_indices])


def greedy(logits: torch.Tensor | None, group: Group, rows: int) -> list[int]:
    """Rank 0's argmax tokens, sent to every rank (the engine's step-input broadcast, done plainly)."""
    tokens = logits.argmax(-1).cpu() if logits is not None else torch.zeros(rows, dtype=torch.int64)
    if group.communicates:
        dist.broadcast(tokens, src=0, group=group.process_group)
    return tokens.tolist()


def scenario(config: ModelConfig, parallel: ParallelConfig, group: Group, checkpoint=None, device: str = "cpu",
             dtype: torch.dtype = torch.float32, forced: bool = False, quantization: str | None = None) -> dict:
    """prompt logits (one prefill step over both prompts), chunked prefill then greedy decode of both together
    (forced: decode fixed tokens instead, so that runs which round differently still see the same context).
    Logits come back on the CPU in fp32."""
    model = build(config, parallel, group, checkpoint, device=device, dtype=dtype, quantization=quantization)
    margins = RouterMargins(model)
    out = {"lightning_heads": model.num_lightning_heads, "kv_heads": model.num_kv_heads,
           "kv_first_head": next(l.self_attn.k_proj.first_head for l in model.model.layers if not l.is_linear)}
    block = BLOCK if device == "cpu" else 256  # flash attention's paged kernel reads blocks of 256
    r = Runner(model, 2, 64, block)
    a, b = r.seq(PROMPTS[0], 0), r.seq(PROMPTS[1], 1)
    out["prompt"] = r.step([(a, len(PROMPTS[0])), (b, len(PROMPTS[1]))], all_logits=True)
    out["prompt_margin"] = margins.take()

    r = Runner(model, 2, 64, block)
    seqs = [r.seq(PROMPTS[0], 0), r.seq(PROMPTS[1], 1)]
    parts, last, chunk_margins = [], [None, None], []  # last: each prompt's final-row logits, where its last chunk ran
    for step in range(max(map(len, CHUNKS))):
        chunks = [(s, c[step]) for s, c in zip(seqs, CHUNKS) if step < len(c)]
        logits = r.step(chunks, all_logits=True)
        parts.append(logits)
        chunk_margins.append(margins.take())
        end = 0
        for (s, n) in chunks:
            end += n
            if logits is not None and s.num_computed == len(s.token_ids):
                last[seqs.index(s)] = logits[end - 1]
    out["chunked"] = None if parts[0] is None else torch.cat(parts)  # rows in step order
    out["chunked_margin"] = torch.cat(chunk_margins)
    logits = None if last[0] is None else torch.stack(last)
    decode, tokens, decode_margins = [], [], []
    for _ in range(DECODE_STEPS):
        nxt = greedy(logits, group, len(seqs))
        if forced:
            nxt = [(31 * len(tokens) + 7 * i) % config.vocab_size for i in range(len(seqs))]
        tokens.append(nxt)
        for s, t in zip(seqs, nxt):
            s.token_ids.append(t)
        logits = r.step([(s, 1) for s in seqs])
        decode.append(logits)
        decode_margins.append(margins.take())
    out["decode"] = None if decode[0] is None else torch.stack(decode)
    out["decode_margin"] = torch.stack(decode_margins)
    margins.close()
    out["tokens"] = tokens
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


TIE_MARGIN = 2 ** -8  # router probability margin below which the GPU tests' bf16 runs may route apart


def assert_close_but_ties(ref: dict, got: dict, key: str, tol: float, what) -> None:
    """got[key] against ref[key] (fp32 logits, rows of tokens): each row within tol of max |ref| except rows
    whose routing is a near-tie in some layer (ref[key + '_margin'] < TIE_MARGIN), held to finiteness only:
    bf16 rounds the router's input by 2^-8 relative, which moves logits of size ~1 and the probabilities by
    about as much, so the expert choice may flip with the partial sums' rounding; at most 1 in 8 rows may be
    such ties."""
    r, g = ref[key], got[key]
    margin = ref[f"{key}_margin"].reshape(r.shape[:-1])
    tie = margin < TIE_MARGIN
    assert tie.sum().item() <= max(1, tie.numel() // 8), (what, key, "near-tie rows", tie.sum().item())
    assert torch.isfinite(g).all(), (what, key)
    err = (g - r).abs().amax(-1) / r.abs().max()
    assert err[~tie].max().item() < tol, (what, key, err.max().item(), "margins", margin.flatten().tolist())


class RouterMargins:
    """Per token of each step, the smallest router margin over the MoE layers: the k-th largest routing
    probability minus the (k+1)-th, from the router's input (fp32 logits of the gate's weight). Where it is
    about bf16's rounding of the hidden state, the expert choice may flip between runs that round differently
    (TP=1 against N ranks), and that token's logits with it."""

    def __init__(self, model):
        self.steps: list[torch.Tensor] = []
        self.moes = [layer.block_sparse_moe for layer in model.model.layers]
        for moe in self.moes:
            moe.route = self._wrap(moe, moe.route)  # an instance attribute: shadows the method

    def _wrap(self, moe, route):
        def recorded(x):
            p = torch.softmax(F.linear(x.float(), moe.gate.weight.float()), dim=-1)
            p = p.topk(moe.top_k + 1, dim=-1).values
            self.steps.append((p[:, -2] - p[:, -1]).cpu())
            return route(x)
        return recorded

    def take(self) -> torch.Tensor:
        """[T] for the step just run (min over its layers), and forget it."""
        if not self.steps:
            raise RuntimeError("no router call was recorded: SparseMoE.route is no longer how the layer routes")
        out = torch.stack(self.steps).amin(0)
        self.steps = []
        return out

    def close(self) -> None:
        for moe in self.moes:
            del moe.route


# ---- checkpoints and scenarios --------------------------------------------------------------------

def write_checkpoint(config: ModelConfig, path: pathlib.Path, packed: bool, seed: int = 1) -> pathlib.Path:
    """Random tensors (norms too) for `config`, in the released names or transformers' packed experts."""
    with torch.device("meta"):
        shapes = checkpoint_shapes(MiniMaxM1ForCausalLM(config))
    g = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=g) * s[-1] ** -0.5 for n, s in sorted(shapes.items())}
    if packed:
        for layer in range(config.num_hidden_layers):
            pre, e = f"model.layers.{layer}.block_sparse_moe", range(config.num_local_experts)
            w1, w3, w2 = ([tensors.pop(f"{pre}.experts.{i}.{w}.weight") for i in e] for w in ("w1", "w3", "w2"))
            tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([torch.stack(w1), torch.stack(w3)], 1)
            tensors[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(w2)
            tensors[f"model.layers.{layer}.mlp.gate.weight"] = tensors.pop(f"{pre}.gate.weight")
    path.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(released_config_json(config)))
    return path


def released_config_json(c: ModelConfig) -> dict:
    return {"architectures": ["MiniMaxM1ForCausalLM"], "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
            "intermediate_size": c.intermediate_size, "num_local_experts": c.num_local_experts,
            "num_experts_per_tok": c.num_experts_per_tok, "attn_type_list": c.attn_type_list,
            "rotary_dim": c.rotary_dim, "rope_theta": c.rope_theta, "postnorm": c.postnorm,
            "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
            "layernorm_full_attention_alpha": c.full_attn_alpha,
            "layernorm_linear_attention_alpha": c.linear_attn_alpha, "layernorm_mlp_alpha": c.mlp_alpha}


def run_spec(spec: dict, world_size: int, group: Group) -> dict:
    """spec: {"ep": bool, and "kv_heads": int, or "checkpoint": dir, or "gpu": True (bf16 on CUDA, gpu_config);
    optionally "quantization": "fp8" | "experts_int8" and "forced": True (decode fixed tokens)}."""
    parallel = ParallelConfig(world_size, spec["ep"])
    quant, forced = spec.get("quantization"), spec.get("forced", False)
    if spec.get("gpu"):
        return scenario(gpu_config(), parallel, group, device="cuda", dtype=torch.bfloat16, forced=True,
                        quantization=quant)
    ckpt = spec.get("checkpoint")
    config = ModelConfig.from_file(ckpt) if ckpt else split_config(spec["kv_heads"])
    return scenario(config, parallel, group, ckpt, forced=forced, quantization=quant)


def run_ranks(world_size: int, specs: dict[str, dict], workdir: pathlib.Path, timeout_s: float = 300) -> list[dict]:
    """Run every spec on `world_size` gloo ranks (one subprocess each, a hard timeout, all killed on the way
    out); returns each rank's {spec name: scenario results}."""
    workdir.mkdir(parents=True, exist_ok=True)
    src = pathlib.Path(minimax_m1.__file__).resolve().parents[1]
    path = [str(src), str(pathlib.Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path))
    if pathlib.Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs, logs = [], []
    try:
        for rank in range(world_size):
            logs.append(open(workdir / f"rank{rank}.log", "w"))
            procs.append(subprocess.Popen([sys.executable, __file__, str(workdir), json.dumps(specs)],
                                          env=dict(env, RANK=str(rank)), stdout=logs[-1], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                log = _tail(workdir / f"rank{failed[0]}.log")
                raise RuntimeError(f"rank {failed[0]} of {world_size} failed (exit {codes[failed[0]]}):\n{log}")
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                log = _tail(workdir / "rank0.log")
                raise TimeoutError(f"{world_size} ranks still running after {timeout_s} s (killed):\n{log}")
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            f.close()
    return [torch.load(workdir / f"results{r}.pt") for r in range(world_size)]


def _tail(path: pathlib.Path, n: int = 4000) -> str:
    return path.read_text()[-n:]


def main() -> None:
    workdir, specs = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    group = init_distributed(backend="gloo", init_method=f"file://{workdir / 'rendezvous'}", timeout_s=60)
    try:
        results = {name: run_spec(spec, group.world_size, group) for name, spec in specs.items()}
        results["_env"] = {k: os.environ.get(k) for k in MULTI_GPU_ENV}  # what init_distributed set
        torch.save(results, workdir / f"results{group.rank}.pt")
        dist.barrier()  # no rank closes its connections while another still uses them
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
