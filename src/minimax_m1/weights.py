"""Checkpoint loading: safetensors (one file or shards with model.safetensors.index.json), in the released
checkpoint's tensor names or in what transformers' MiniMaxForCausalLM.save_pretrained writes.

The model names the tensors it needs (MiniMaxM1ForCausalLM.checkpoint_tensors, packed_tensor) and each
parameter's weight_loader takes its rank's boxes of a tensor (layers/linear.py), so loading is a loop over
checkpoint tensors: a rank reads only its own slices (`get_slice(name)[box]`), one box in host memory at a
time. Dummy weights (load_format="dummy") go through the same loaders.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import pathlib

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .layers.linear import Box
from .models.minimax_m1 import DERIVED, MiniMaxM1ForCausalLM
from .quantization.checkpoint import CHANNEL, EIGHT_BIT, SAFETENSORS_DTYPES, DequantizedTensor, weight_of_scale


class WeightError(ValueError):
    """The checkpoint does not match the model: missing, unexpected or mis-shaped tensors."""


def resolve(model: MiniMaxM1ForCausalLM, names, dtypes: dict[str, torch.dtype] | None = None
            ) -> dict[str, tuple[str, object]]:
    """Map checkpoint tensor names onto (parameter name, shard id); raise WeightError naming every missing or
    unexpected tensor (missing ones in the released spelling). `dtypes` (name -> stored dtype, when known) tells
    8-bit tensors from the others; see resolve_checkpoint for them."""
    return resolve_checkpoint(model, names, dtypes)[0]


def resolve_checkpoint(model: MiniMaxM1ForCausalLM, names, dtypes: dict[str, torch.dtype] | None = None
                       ) -> tuple[dict[str, tuple[str, object]], dict[str, tuple[str, str]]]:
    """(plan, dequantize): plan as `resolve`; dequantize maps each 8-bit weight that must be read as fp32 values
    to (its scale tensor, CHANNEL | BLOCK) (quantization/checkpoint.py): every 8-bit tensor except those stored
    in the form of the parameter they fill (an 8-bit expert parameter of the same type with per-channel scales,
    whose scales then load into their own parameter)."""
    dtypes = dtypes or {}
    names = list(names)
    scales = {}  # weight name -> (scale name, kind)
    for name in names:
        of = weight_of_scale(name)
        if of is not None:
            scales[of[0]] = (name, of[1])
    released = model.checkpoint_tensors()
    param_list = dict(model.named_parameters())
    params = set(param_list)
    plan, dequantize, unexpected, used_scales, unscaled = {}, {}, [], set(), []
    for name in names:
        if DERIVED.match(name) or weight_of_scale(name) is not None:
            continue  # scales: placed with their weights below
        target = released.get(name)
        if target is None and model.packed_tensor(name) in params:
            target = (model.packed_tensor(name), None)
        if target is None:
            unexpected.append(name)
            continue
        plan[name] = target
        if name not in scales:
            if dtypes.get(name) in EIGHT_BIT:
                unscaled.append(name)
            continue
        scale, kind = scales[name]
        used_scales.add(scale)
        scale_target = released.get(scale)
        packed = model.packed_tensor(name)
        if scale_target is None and packed is not None and packed + "_scale" in params:
            scale_target = (packed + "_scale", None)
        stored = dtypes.get(name, param_list[target[0]].dtype)
        if kind == CHANNEL and scale_target is not None and stored == param_list[target[0]].dtype:
            plan[scale] = scale_target  # already in this format: q and the scales load as they are
        else:
            dequantize[name] = (scale, kind)
    unexpected += sorted(set(n for n in names if weight_of_scale(n) is not None) - used_scales)
    whole = {p for p, shard in plan.values() if shard is None}
    loaded = set(plan.values())
    missing = sorted(n for n, (p, shard) in released.items()
                     if p not in whole and (p, shard) not in loaded and weight_of_scale(n) is None)
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the checkpoint: {_short(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) the model has no place for: {_short(sorted(unexpected))}")
    if unscaled:
        problems.append(f"{len(unscaled)} 8-bit tensor(s) without their scales (X.weight_scale, X_scale or "
                        f"X.weight_scale_inv): {_short(sorted(unscaled))}")
    if problems:
        raise WeightError("; ".join(problems))
    return plan, dequantize


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
        self.dtype = SAFETENSORS_DTYPES.get(sliced.get_dtype())

    def __getitem__(self, index: Box) -> torch.Tensor:
        return self.sliced[index]


def checkpoint_dtypes(files: dict[str, pathlib.Path]) -> dict[str, torch.dtype | None]:
    """tensor name -> its stored dtype, from the shards' headers (None for a dtype torch has no name for)."""
    by_file: dict[pathlib.Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    dtypes = {}
    for f, names in by_file.items():
        with _open_shard(f) as sf:
            for name in names:
                dtypes[name] = SAFETENSORS_DTYPES.get(sf.get_slice(name).get_dtype())
    return dtypes


def load_checkpoint(model: MiniMaxM1ForCausalLM, path: str | pathlib.Path, progress: bool = True) -> None:
    """Fill this rank's parameters (already on their device/dtype) from a safetensors checkpoint: float tensors,
    8-bit experts in the model's own format, or 8-bit tensors read as their dequantised values (see
    quantization/checkpoint.py). Host memory holds one box (at most one expert tensor) at a time."""
    files = checkpoint_files(pathlib.Path(path))
    plan, dequantize = resolve_checkpoint(model, files, checkpoint_dtypes(files))
    by_file: dict[pathlib.Path, list[str]] = {}
    for name in plan:
        by_file.setdefault(files[name], []).append(name)
    params = dict(model.named_parameters())
    show = progress and model.group.rank == 0
    for f in tqdm(sorted(by_file), desc="Loading weights", unit="shard", disable=not show):
        with _open_shard(f) as sf:
            for name in by_file[f]:
                pname, shard_id = plan[name]
                param = params[pname]
                shape, pieces = param.load_plan(shard_id)
                tensor = _Lazy(sf.get_slice(name))
                if tensor.shape != shape:
                    raise WeightError(
                        f"tensor {name} in {f.name} has shape {list(tensor.shape)}, the model expects {list(shape)}")
                if pieces:  # nothing to read where another rank holds all of it (expert parallelism)
                    with _dequantized(tensor, name, dequantize, files, sf, f) as tensor:
                        param.weight_loader(param, tensor, shard_id)
    model.process_weights_after_loading()


@contextlib.contextmanager
def _dequantized(tensor, name, dequantize, files, sf, f):
    """`tensor`, or for an 8-bit weight to be read as values, a DequantizedTensor with its scales (opened from
    their own shard when they sit in another one)."""
    if name not in dequantize:
        yield tensor
        return
    scale, kind = dequantize[name]
    with contextlib.ExitStack() as stack:
        other = sf if files[scale] == f else stack.enter_context(_open_shard(files[scale]))
        yield DequantizedTensor(tensor, _Lazy(other.get_slice(scale)), kind, name)


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
            if weight_of_scale(name) is not None:
                continue  # an 8-bit weight's loader writes its scales
            p = params[pname]
            shape, pieces = p.load_plan(shard)
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif pieces:
                p.weight_loader(p, _DummyTensor(name, shape, seed, p.device), shard)
            bar.update(sum(_box_numel(dst) for _, dst in pieces) * p.element_size())
    model.process_weights_after_loading()


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
        self.shape, self.device, self.dtype = shape, device, torch.float32
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
