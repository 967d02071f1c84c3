"""Checkpoint loading: safetensors (one file or shards with model.safetensors.index.json), both the
released checkpoint's tensor names and what transformers' MiniMaxForCausalLM.save_pretrained writes,
loaded shard by shard straight into the parameters (built on the meta device) on the target device/dtype.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .models.minimax_m1 import MiniMaxM1ForCausalLM

# Buffers transformers derives from the config and saves anyway; the engine recomputes them.
_DERIVED = re.compile(r"model\.layers\.\d+\.self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay)$"
                      r"|model\.rotary_emb\.inv_freq$|.*\.rotary\.inv_freq$")
_EXPERT = re.compile(r"(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_HF_PACKED = re.compile(r"(model\.layers\.\d+)\.mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)$")


class WeightError(ValueError):
    """The checkpoint does not match the model: missing, unexpected or mis-shaped tensors."""


@dataclasses.dataclass(frozen=True)
class Target:
    param: str  # parameter name in MiniMaxM1ForCausalLM
    index: tuple  # where in the parameter the tensor goes (() = the whole parameter)
    shape: tuple[int, ...]  # the shape the checkpoint tensor must have
    pieces: tuple  # coverage keys this tensor fills


def _targets(model: MiniMaxM1ForCausalLM) -> tuple[dict[str, Target], dict[str, set]]:
    """Every released-checkpoint tensor name -> Target, and for each parameter the pieces that cover it."""
    cfg = model.config
    i = cfg.intermediate_size
    targets, needed = {}, {}
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        m = re.match(r"(model\.layers\.\d+)\.block_sparse_moe\.(w13|w2)$", name)
        if not m:
            targets[name] = Target(name, (), shape, ((name, None),))
            needed[name] = {(name, None)}
            continue
        layer, which = m.groups()
        needed[name] = set()
        for e in range(cfg.num_local_experts):
            prefix = f"{layer}.block_sparse_moe.experts.{e}"
            if which == "w13":
                parts = (("w1", slice(0, i)), ("w3", slice(i, 2 * i)))
                for part, rows in parts:
                    key = (name, (e, part))
                    targets[f"{prefix}.{part}.weight"] = Target(name, (e, rows), (i, shape[2]), (key,))
                    needed[name].add(key)
            else:
                key = (name, (e, "w2"))
                targets[f"{prefix}.w2.weight"] = Target(name, (e,), shape[1:], (key,))
                needed[name].add(key)
    if cfg.tie_word_embeddings:
        targets.pop("lm_head.weight", None)
        needed.pop("lm_head.weight", None)
    return targets, needed


def resolve(model: MiniMaxM1ForCausalLM, names) -> dict[str, Target]:
    """Map checkpoint tensor names onto the model; raise WeightError naming every missing or unexpected tensor."""
    targets, needed = _targets(model)
    plan, unexpected, covered = {}, [], set()
    for name in names:
        if _DERIVED.match(name):
            continue
        t = targets.get(name) or _hf_packed_target(name, model, needed)
        if t is None:
            unexpected.append(name)
            continue
        plan[name] = t
        covered.update(t.pieces)
    missing = sorted(_piece_name(k) for pieces in needed.values() for k in pieces - covered)
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the checkpoint: {_short(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) the model has no place for: {_short(sorted(unexpected))}")
    if problems:
        raise WeightError("; ".join(problems))
    return plan


def _hf_packed_target(name: str, model, needed) -> Target | None:
    """transformers >= 5 spelling: mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I],
    mlp.gate.weight (the router)."""
    m = _HF_PACKED.match(name)
    if not m:
        return None
    layer, what = m.groups()
    param = {"experts.gate_up_proj": "w13", "experts.down_proj": "w2", "gate.weight": "gate.weight"}[what]
    pname = f"{layer}.block_sparse_moe.{param}"
    if pname not in needed:
        return None
    shape = tuple(model.get_parameter(pname).shape)
    return Target(pname, (), shape, tuple(needed[pname]))


def _piece_name(key) -> str:
    param, piece = key
    if piece is None:
        return param
    e, part = piece
    return param.replace(f"block_sparse_moe.{'w13' if part != 'w2' else 'w2'}",
                         f"block_sparse_moe.experts.{e}.{part}.weight")


def _short(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def checkpoint_files(path: pathlib.Path) -> dict[str, pathlib.Path]:
    """tensor name -> file, from model.safetensors.index.json or the single model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: path / f for name, f in weight_map.items()}
        absent = sorted({str(f) for f in files.values() if not f.is_file()})
        if absent:
            raise FileNotFoundError(f"{len(absent)} shard(s) named in {index} are absent: {_short(absent, 3)}")
        return files
    single = sorted(path.glob("*.safetensors"))
    if not single:
        raise FileNotFoundError(f"no *.safetensors files and no model.safetensors.index.json in {path}")
    files = {}
    for f in single:
        with _open_shard(f) as sf:
            for name in sf.keys():
                files[name] = f
    return files


def _open_shard(path: pathlib.Path, device: str = "cpu"):
    """safe_open(path) for reading tensors onto `device`; a file safetensors cannot read (cut short by an
    interrupted download, or damaged) raises a WeightError naming it instead of a bare SafetensorError."""
    try:
        return safe_open(path, "pt", device=device)
    except SafetensorError as e:
        raise WeightError(f"{path} looks truncated or corrupt ({e}): download it again") from None
    except OSError as e:
        raise WeightError(f"cannot read {path} ({e.strerror or e}): check the file, or download it again") from None


def load_checkpoint(model: MiniMaxM1ForCausalLM, path: str | pathlib.Path, progress: bool = True) -> None:
    """Fill the model's parameters (already on their device/dtype) from a safetensors checkpoint."""
    files = checkpoint_files(pathlib.Path(path))
    plan = resolve(model, files)
    by_file: dict[pathlib.Path, list[str]] = {}
    for name in plan:
        by_file.setdefault(files[name], []).append(name)
    params = dict(model.named_parameters())
    for f in tqdm(sorted(by_file), desc="Loading weights", unit="shard", disable=not progress):
        with _open_shard(f) as sf:
            for name in by_file[f]:
                target = plan[name]
                shape = tuple(sf.get_slice(name).get_shape())
                if shape != target.shape:
                    raise WeightError(
                        f"tensor {name} in {f.name} has shape {list(shape)}, the model expects {list(target.shape)}")
                with torch.no_grad():
                    dst = params[target.param]
                    dst[target.index].copy_(sf.get_tensor(name))


# Dummy initialisation shows a progress bar from this many bytes on: the real shapes take minutes, tiny is instant.
_DUMMY_PROGRESS_BYTES = 1 << 30


@torch.no_grad()
def init_dummy(model: MiniMaxM1ForCausalLM, seed: int = 0, generator_device: str | None = None,
               progress: bool = True) -> None:
    """Random weights of the real shapes (load_format="dummy"): norms at 1, the rest N(0, 1/fan_in).
    Drawn on `generator_device` (default: each parameter's own device) from a fixed seed, so the same
    seed gives the same model whatever the target device when generator_device="cpu". With `progress`, models
    of more than _DUMMY_PROGRESS_BYTES show a progress bar in bytes."""
    params = list(model.named_parameters())
    total = sum(p.numel() * p.element_size() for _, p in params)
    with tqdm(total=total, desc="Initialising dummy weights", unit="B", unit_scale=True,
              disable=not progress or total < _DUMMY_PROGRESS_BYTES) as bar:
        for name, p in params:
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
                bar.update(p.numel() * p.element_size())
                continue
            dev = generator_device or p.device
            g = torch.Generator(device=dev).manual_seed(seed + _stable_hash(name))
            scale = p.shape[-1] ** -0.5
            for part in (p if p.dim() == 3 else [p]):  # expert by expert: bounds the fp32 scratch
                part.copy_(torch.randn(part.shape, generator=g, device=dev, dtype=torch.float32) * scale)
                bar.update(part.numel() * part.element_size())


def _stable_hash(name: str) -> int:
    h = 0
    for c in name.encode():
        h = (h * 131 + c) % 1_000_003
    return h
