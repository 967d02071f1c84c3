"""8-bit tensors in checkpoints: the names of scales, the quantization_config entry, and dequantising reads.

The saved format (written by convert.py, `minimax-m1 quantize SRC DST --quantization METHOD`):
- each routed-expert tensor keeps its name and shape and holds q in the method's type (int8 or float8_e4m3fn),
  its per-row fp32 scales beside it: a released expert tensor X.weight [rows, K] gets X.weight_scale [rows];
  transformers' packed X [E, rows, K] (mlp.experts.gate_up_proj, mlp.experts.down_proj) gets X_scale [E, rows];
- every other tensor as in the source, in the checkpoint dtype;
- config.json gains "quantization_config": {"quant_method": METHOD, "format": FORMAT, "weight_dtype": ...,
  "weight_scales": "per-output-channel", "activation_scheme": "dynamic" (fp8) | "none" (int8), "modules":
  ["block_sparse_moe.experts"]}.
Loading it with the same method copies q and the scales into place (no arithmetic): the loaded model equals the
one quantised at load time from the bf16 source, bit for bit.

Public fp8 checkpoints (quantization_config {"quant_method": "fp8", "weight_block_size": [128, 128]}) store
X.weight in e4m3 with X.weight_scale_inv [ceil(N/128), ceil(K/128)]. Any 8-bit tensor that is not in the
requested method's own per-channel form (block scales, the other method, or an unquantised model) is read
through `DequantizedTensor` (fp32 values) and goes through the ordinary loaders: the experts are quantised again
per channel, every other tensor is cast to the model dtype.
"""
from __future__ import annotations

import json
import pathlib
import re

import torch

from ..config import QUANT_METHODS, ConfigError
from ..ops.moe.quantized import WEIGHT_DTYPES

FORMAT = "minimax-m1-per-channel"
CHANNEL, BLOCK = "channel", "block"
EIGHT_BIT = (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)
# safetensors' dtype names (safe_open(...).get_slice(name).get_dtype())
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
                      "I64": torch.int64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
                      "BOOL": torch.bool}
_EXPERT = re.compile(r"model\.layers\.\d+\.(block_sparse_moe\.experts\.\d+\.w[123]\.weight"
                     r"|mlp\.experts\.(gate_up_proj|down_proj))$")


def is_expert_tensor(name: str) -> bool:
    """A routed expert's weight, in the released or transformers' packed spelling (what 8-bit methods quantise)."""
    return bool(_EXPERT.match(name))


def scale_name(weight: str) -> str:
    """The per-channel scale tensor saved beside an expert weight."""
    return weight + "_scale" if not weight.endswith(".weight") else weight[:-len(".weight")] + ".weight_scale"


def weight_of_scale(name: str) -> tuple[str, str] | None:
    """(weight name, CHANNEL | BLOCK) when `name` is a scale tensor, else None."""
    if name.endswith(".weight_scale_inv"):
        return name[:-len("_scale_inv")], BLOCK
    if name.endswith(".weight_scale"):
        return name[:-len("_scale")], CHANNEL
    if is_expert_tensor(name[:-len("_scale")]) and name.endswith("_scale"):
        return name[:-len("_scale")], CHANNEL
    return None


def quantization_config(method: str) -> dict:
    """The config.json entry of the saved format."""
    return {"quant_method": method, "format": FORMAT, "weight_dtype": str(WEIGHT_DTYPES[method]).split(".")[-1],
            "weight_scales": "per-output-channel", "activation_scheme": "dynamic" if method == "fp8" else "none",
            "modules": ["block_sparse_moe.experts"]}


def checkpoint_quantization(path: str | pathlib.Path) -> str | None:
    """The method a checkpoint directory's config.json says its weights are in (None: not quantised). Raises
    ConfigError for a quantization_config this engine cannot read."""
    path = pathlib.Path(path)
    cfg = path / "config.json" if path.is_dir() else path
    try:
        entry = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None  # ModelConfig.from_file reports an unreadable config.json
    if entry is None:
        return None
    method = entry.get("quant_method") if isinstance(entry, dict) else None
    if method in QUANT_METHODS and (entry.get("format") in (None, FORMAT) or method == "fp8"):
        return method
    raise ConfigError(f"{cfg}: quantization_config {entry!r} is not a format this engine reads: it loads "
                      f"{', '.join(QUANT_METHODS)} checkpoints written by `minimax-m1 quantize`, fp8 checkpoints "
                      "with 128x128 block scales (weight_scale_inv), and unquantised ones")


class DequantizedTensor:
    """An 8-bit checkpoint tensor and its scales, read box by box as fp32 values (q * scale). q and scale are
    tensors or lazy safetensors slices (box indexing, .shape); kind CHANNEL: scale [..., rows]; BLOCK: scale
    [..., ceil(rows/128), ceil(K/128)]."""

    dtype = torch.float32

    def __init__(self, q, scale, kind: str, name: str = "?"):
        self.q, self.scale, self.kind, self.shape = q, scale, kind, tuple(q.shape)
        want = self.shape[:-1] if kind == CHANNEL else (
            *self.shape[:-2], -(-self.shape[-2] // 128), -(-self.shape[-1] // 128))
        if tuple(scale.shape) != want:
            raise ConfigError(f"the {kind} scales of {name} have shape {list(scale.shape)}, its weight "
                              f"{list(self.shape)} needs {list(want)}")

    def __getitem__(self, box: tuple[slice, ...]) -> torch.Tensor:
        q = self.q[box]
        if self.kind == CHANNEL:
            return q.float() * self.scale[box[:-1]].float()[..., None]
        from .fp8 import dequantize_blocks

        lead = box[:-2]
        scale = self.scale[lead + (slice(0, self.scale.shape[-2]), slice(0, self.scale.shape[-1]))]
        return dequantize_blocks(q, scale, box[-2], box[-1])
