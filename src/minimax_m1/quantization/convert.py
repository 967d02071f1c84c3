"""`minimax-m1 quantize SRC DST --quantization METHOD`: write a checkpoint with 8-bit routed experts, once, so
that later loads copy them into place (gpt-fast's offline step; the format is in checkpoint.py).

Shard by shard: each source shard is read, its expert tensors quantised one expert at a time, and written as a
shard of the same name, so host memory holds one source shard and its output. No model is built and no GPU is
used. The quantisation is the load-time one (quantization/base.py) applied to the stored values, so loading
DST with the method gives the same weights as loading SRC with it (for a checkpoint stored in the model dtype,
as the released bf16 one is).
"""
from __future__ import annotations

import json
import pathlib
import shutil

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..config import ConfigError, ModelConfig, QuantConfig
from ..ops.moe.quantized import WEIGHT_DTYPES, quantize_weight
from ..weights import _Lazy, _open_shard, checkpoint_dtypes, checkpoint_files
from .checkpoint import CHANNEL, checkpoint_quantization, DequantizedTensor, is_expert_tensor, quantization_config, scale_name, weight_of_scale

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def quantize_checkpoint(src: str | pathlib.Path, dst: str | pathlib.Path, method: str,
                        progress: bool = True) -> pathlib.Path:
    """Write SRC's checkpoint to the new or empty directory DST with `method` experts; returns DST."""
    QuantConfig(method)
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    ModelConfig.from_file(src)  # a model this engine runs
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not an empty directory: give a new directory for the output")
    raw = json.loads((src / "config.json").read_text(encoding="utf-8"))
    entry = raw.get("quantization_config") or {}
    if checkpoint_quantization(src) == method and "weight_block_size" not in entry:
        raise ConfigError(f"{src} already holds {method} experts: load it with --quantization {method}")
    # 8-bit sources are read as values and rounded to the checkpoint dtype (what the unquantised model holds)
    dtype = _DTYPES.get(raw.get("torch_dtype") or "bfloat16", torch.bfloat16)
    files = checkpoint_files(src)
    dtypes = checkpoint_dtypes(files)
    scales = {}
    for name in files:
        of = weight_of_scale(name)
        if of is not None:
            scales[of[0]] = (name, of[1])
    by_file: dict[pathlib.Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    dst.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for f in tqdm(sorted(by_file), desc=f"Quantising experts to {method}", unit="shard", disable=not progress):
        out = {}
        with _open_shard(f) as sf:
            for name in sorted(by_file[f]):
                if weight_of_scale(name) is not None:
                    continue  # read with its weight
                if name in scales:
                    scale, kind = scales[name]
                    with _open_shard(files[scale]) as other:
                        values = _read_dequantized(sf, name, other.get_slice(scale), kind)
                    if is_expert_tensor(name) and kind == CHANNEL and dtypes[name] == WEIGHT_DTYPES[method]:
                        raise ConfigError(f"{src} holds {name} in {method} already: load it with --quantization "
                                          f"{method}")
                    values = values.to(dtype)
                else:
                    values = sf.get_tensor(name)
                if is_expert_tensor(name):
                    out[name], out[scale_name(name)] = _quantize(values, method)
                else:
                    out[name] = values.contiguous()
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
        weight_map.update({n: f.name for n in out})
        del out
    raw["quantization_config"] = quantization_config(method)
    (dst / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                 indent=2) + "\n", encoding="utf-8")
    for p in src.iterdir():  # tokenizer, generation config, chat template, ...
        if p.is_file() and p.suffix != ".safetensors" and p.name not in ("config.json",
                                                                          "model.safetensors.index.json"):
            shutil.copy2(p, dst / p.name)
    return dst


def _read_dequantized(sf, name: str, scale, kind: str) -> torch.Tensor:
    t = DequantizedTensor(_Lazy(sf.get_slice(name)), _Lazy(scale), kind, name)
    return t[tuple(slice(0, n) for n in t.shape)]


def _quantize(w: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel q and scales of an expert tensor, one expert at a time for a packed [E, rows, K] one."""
    if w.dim() == 2:
        return quantize_weight(w, method)
    parts = [quantize_weight(w[e], method) for e in range(w.shape[0])]
    return torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])
