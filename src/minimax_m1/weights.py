"""Checkpoint loading: safetensors (one file or shards with model.safetensors.index.json), in the released
checkpoint's tensor names or in what transformers' MiniMaxForCausalLM.save_pretrained writes.

The model names the tensors it needs (MiniMaxM1ForCausalLM.checkpoint_tensors, packed_tensor) and each
parameter's weight_loader takes its rank's boxes of a tensor (layers/linear.py), so loading is a loop over
checkpoint tensors: a rank reads only its own slices (`get_slice(name)[box]`), one box in host memory at a
time. Dummy weights (load_format="dummy") go through the same loaders.
"""
from __future__ import annotations

import hashlib
import json
import pathlib

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .layers.linear import Box
from .models.minimax_m1 import DERIVED, MiniMaxM1ForCausalLM


class WeightError(ValueError):
    """The checkpoint does not match the model: missing, unexpected or mis-shaped tensors."""


def resolve(model: MiniMaxM1ForCausalLM, names) -> dict[str, tuple[str, object]]:
    """Map checkpoint tensor names onto (parameter name, shard id); raise WeightError naming every missing or
    unexpected tensor (missing ones in the released spelling)."""
    released = model.checkpoint_tensors()
    params = {p for p, _ in released.values()}
    plan, unexpected = {}, []
    for name in names:
        if DERIVED.match(name):
            continue
        target = released.get(name)
        if target is None and model.packed_tensor(name) in params:
            target = (model.packed_tensor(name), None)
        if target is None:
            unexpected.append(name)
        else:
            plan[name] = target
    whole = {p for p, shard in plan.values() if shard is None}
    loaded = set(plan.values())
    missing = sorted(n for n, (p, shard) in released.items() if p not in whole and (p, shard) not in loaded)
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the checkpoint: {_short(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) the model has no place for: {_short(sorted(unexpected))}")
    if problems:
        raise WeightError("; ".join(problems))
    return plan


def checkpoint_shapes(model: MiniMaxM1ForCausalLM) -> dict[str, tuple[int, ...]]:
    """Every released-checkpoint tensor the model needs -> its (whole, unsplit) shape."""
    params = dict(model.named_parameters())
    return {name: params[p].load_plan(shard)[0] for name, (p, shard) in model.checkpoint_tensors().items()}


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


class _Lazy:
    """A tensor in a safetensors file, read box by box."""

    def __init__(self, sliced):
        self.sliced, self.shape = sliced, tuple(sliced.get_shape())

    def __getitem__(self, index: Box) -> torch.Tensor:
        return self.sliced[index]


def load_checkpoint(model: MiniMaxM1ForCausalLM, path: str | pathlib.Path, progress: bool = True) -> None:
    """Fill this rank's parameters (already on their device/dtype) from a safetensors checkpoint."""
    files = checkpoint_files(pathlib.Path(path))
    plan = resolve(model, files)
    by_file: dict[pathlib.Path, list[str]] = {}
    for name in plan:
        by_file.setdefault(files[name], []).append(name)
    params = dict(model.named_parameters())
    show = progress and model.group.rank == 0
    for f in tqdm(sorted(by_file), desc="Loading weights", unit="shard", disable=not show):
        with _open_shard(f) as sf:
            for name in by_file[f]:
                pname, shard = plan[name]
                param = params[pname]
                shape, pieces = param.load_plan(shard)
                tensor = _Lazy(sf.get_slice(name))
                if tensor.shape != shape:
                    raise WeightError(
                        f"tensor {name} in {f.name} has shape {list(tensor.shape)}, the model expects {list(shape)}")
                if pieces:  # nothing to read where another rank holds all of it (expert parallelism)
                    param.weight_loader(param, tensor, shard)


# Dummy initialisation shows a progress bar from this many bytes on: the real shapes take minutes, tiny is instant.
_DUMMY_PROGRESS_BYTES = 1 << 30


@torch.no_grad()
def init_dummy(model: MiniMaxM1ForCausalLM, seed: int = 0, progress: bool = True) -> None:
    """Random weights of the real shapes (load_format="dummy"): norms at 1; every other released-checkpoint
    tensor uniform with the variance of N(0, 1/fan_in), each element a hash of (seed, tensor name, its index
    in the whole tensor). Any box is computed on its own, on the parameter's device: a rank generates only
    its own slices (fast on a GPU, bounded memory), the model is the same on every device, and the TP=N model
    of a seed is exactly the TP=1 model sliced. With `progress`, rank 0 of a model of more than
    _DUMMY_PROGRESS_BYTES (this rank's share) shows a progress bar in bytes."""
    params = dict(model.named_parameters())
    total = sum(p.numel() * p.element_size() for p in params.values())
    show = progress and model.group.rank == 0 and total >= _DUMMY_PROGRESS_BYTES
    with tqdm(total=total, desc="Initialising dummy weights", unit="B", unit_scale=True, disable=not show) as bar:
        for name, (pname, shard) in model.checkpoint_tensors().items():
            p = params[pname]
            shape, pieces = p.load_plan(shard)
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif pieces:
                p.weight_loader(p, _DummyTensor(name, shape, seed, p.device), shard)
            bar.update(sum(_box_numel(dst) for _, dst in pieces) * p.element_size())


def _box_numel(b: Box) -> int:
    n = 1
    for s in b:
        n *= s.stop - s.start
    return n


class _DummyTensor:
    """One dummy checkpoint tensor; indexing with a box computes that box (fp32, on `device`)."""

    CHUNK = 1 << 22  # elements per generation step: bounds the int64 scratch

    def __init__(self, name: str, shape: tuple[int, ...], seed: int, device):
        assert torch.Size(shape).numel() < 1 << 32, (name, shape)  # the hash takes 32-bit element indices
        self.shape, self.device = shape, device
        self.key = int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=4).digest(), "little")
        self.scale = (3.0 / shape[-1]) ** 0.5  # uniform(-a, a) has variance a^2 / 3

    def __getitem__(self, index: Box) -> torch.Tensor:
        strides = [1] * len(self.shape)
        for d in range(len(self.shape) - 2, -1, -1):
            strides[d] = strides[d + 1] * self.shape[d + 1]
        sizes = [s.stop - s.start for s in index]
        out = torch.empty(sizes, dtype=torch.float32, device=self.device)
        rest = torch.zeros((), dtype=torch.int64, device=self.device)  # flat offset of the trailing dims
        for d in range(len(sizes) - 1, 0, -1):
            ar = torch.arange(index[d].start, index[d].stop, device=self.device) * strides[d]
            rest = ar.view([-1] + [1] * (len(sizes) - 1 - d)) + rest
        rows = max(1, self.CHUNK // max(1, rest.numel()))
        for a in range(0, sizes[0], rows):
            lead = torch.arange(index[0].start + a, index[0].start + min(sizes[0], a + rows), device=self.device)
            flat = lead.view([-1] + [1] * (len(sizes) - 1)) * strides[0] + rest
            out[a:a + rows] = _hash_uniform(flat, self.key).mul_(self.scale)
        return out


def _hash_uniform(idx: torch.Tensor, key: int) -> torch.Tensor:
    """Uniform in [-1, 1) from 32-bit element indices (int64 tensor) and a 32-bit key: an integer hash
    (two xor-shift-multiply rounds) kept in 32 bits inside int64, so it is exact on every device."""
    m = 0xFFFFFFFF
    x = idx.bitwise_xor(key)
    for _ in range(2):
        x = (x ^ (x >> 16)).mul_(0x45D9F3B).bitwise_and_(m)
    x = x ^ (x >> 16)
    return (x >> 8).float().mul_(2.0 ** -23).sub_(1.0)
