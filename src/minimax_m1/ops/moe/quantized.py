"""8-bit routed experts: the formats, the fp32 reference, and the torch paths for the batches the fused kernel
(cuda.moe_experts_quantized) does not take.

The formats (the fused kernel follows the same contract):
- weights w13 [E, 2I, H] and w2 [E, H, I] as int8 ("experts_int8") or float8_e4m3fn ("fp8"), per-output-channel
  fp32 scales w13_scale [E, 2I] and w2_scale [E, H]: the weight is q * scale[row]. Symmetric: scale =
  max|w_row| / QMAX (127, or 448 = e4m3's largest finite value; 1 for an all-zero row) and q = w / scale
  rounded to nearest (ties to even) and saturated.
- experts_int8 is W8A16: y_c = scale_c * sum_k x_k q_ck, x in the model dtype, fp32 accumulation (int8 values
  are exact in bf16).
- fp8 is W8A8: for each row x_t, a_t = max|x_t| / 448 (1 for a zero row) and xq_t = e4m3(x_t / a_t); y_tc =
  a_t scale_c sum_k xq_tk q_ck with fp32 accumulation. act = silu(g) * u is rounded to the model dtype once (as
  the bf16 path) and then quantised the same way for w2. Under tensor parallelism each rank quantises its own
  slice of act (its scale is that slice's max): finer than one device's per-token scale, so TP=N fp8 differs
  from TP=1 fp8 within the format's rounding, while int8 and expert parallelism agree to fp32 rounding.
- Routing, the fp32 routing weights and the top-k combine are the bf16 path's.

Rounding error of one weight (or activation) element v with scale s: int8 |v - q s| <= s / 2; e4m3 (3 mantissa
bits) |v - q s| <= 2^-4 |v| in e4m3's normal range (|v / s| >= 2^-6) and <= 2^-10 s below it (subnormal step
2^-9). tests/test_quantization.py turns these into layer and logit tolerances.

Paths for batches above the fused kernel's rows (and wherever it does not serve):
- fp8, bf16 activations, CUDA sm_90: torch._scaled_grouped_mm on e4m3 tensor cores (rowwise scales: a_t per row
  of the sorted rows, scale_c per output column of each expert), fp32 accumulation (no fast accumulation); the
  rows quantised by cuda.fp8_rows (gathered x; act from the gate | up rows), one kernel each;
- int8 where torch._grouped_mm serves (bf16 on sm_90+): the layer's experts dequantised to bf16 for the call
  (per layer per step, one compiled kernel on CUDA), then the bf16 grouped GEMM. The dequantised copy is transient: w13's is freed before
  w2's is made, so the scratch is at most 2/3 of the layer's experts in bf16 (0.9 GB per rank at TP8);
- everything else (the CPU, other GPUs): `dequantized_experts`, the weights dequantised to x's dtype and the
  usual grouped math, with the activations quantised and dequantised for fp8.
`reference_quantized_experts` is the fp32 oracle of the format that every path is tested against.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import cuda
from .grouped import grouped_mm, grouped_mm_capturable, grouped_moe, silu_mul

FP8_MAX = 448.0  # e4m3fn's largest finite value
QMAX = {"fp8": FP8_MAX, "experts_int8": 127.0}
WEIGHT_DTYPES = {"fp8": torch.float8_e4m3fn, "experts_int8": torch.int8}


def _method(method: str) -> str:
    if method not in QMAX:
        raise ValueError(f"unknown expert quantization {method!r}: use one of {', '.join(QMAX)}")
    return method


def _row_scale(v: torch.Tensor, qmax: float) -> torch.Tensor:
    """max|v| / qmax over the last dim in fp32; 1 for an all-zero row (its q is 0 whatever the scale)."""
    amax = v.abs().amax(-1).float()
    # a tensor divisor: torch multiplies by the reciprocal of a scalar one on CUDA, which is not the IEEE
    # quotient the fused kernel computes (one ulp apart in some rows; where max|row| is a round number,
    # many of the row's elements land exactly on e4m3 midpoints and that ulp decides their rounding)
    return torch.where(amax > 0, amax / torch.full_like(amax, qmax), torch.ones_like(amax))


def _round(v: torch.Tensor, scale: torch.Tensor, method: str) -> torch.Tensor:
    """v / scale (fp32, per row) rounded to the method's 8-bit type, saturated (torch's e4m3 cast turns values
    past 448 into NaN, so the clamp comes first; its rounding is to nearest even, as torch.round's)."""
    t = v.float() / scale[..., None]
    if method == "fp8":
        return t.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return t.round_().clamp_(-127, 127).to(torch.int8)


def quantize_weight(w: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (q [..., N, K] int8 / float8_e4m3fn, scale [..., N] fp32): per output channel (row),
    symmetric, scale = max|w_row| / QMAX."""
    scale = _row_scale(w, QMAX[_method(method)])
    return _round(w, scale, method), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., N, K] with scale [..., N] -> q * scale[row] in `dtype` (computed in fp32, rounded once). One
    elementwise kernel for int8 (reads 1 byte, writes dtype's): torch computes int8 * fp32 in fp32 and casts to
    `out`'s dtype as it stores. e4m3 takes a cast to `dtype` first (exact: e4m3 values are bf16/fp16 values),
    as torch does not promote float8."""
    if q.dtype != torch.int8:
        q = q.to(dtype)
    elif q.is_cuda and dtype != torch.float32:
        return _compiled_dequantize()(q, scale, dtype)
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    return torch.mul(q, scale[..., None], out=out)


def _dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[..., None]).to(dtype)


@functools.cache
def _compiled_dequantize():
    """_dequantize_int8 through torch.compile: one generated kernel that reads the int8 and writes `dtype` at
    copy bandwidth, the same values as the eager mul (fp32 product, rounded once). Eager torch takes its
    mixed-dtype broadcast path there: an H200 dequantised MiniMax-M1's w13 ([32, 18432, 6144]) in 14.8 ms
    eagerly, 2.98 ms compiled (3.65 TB/s; a plain int8 -> bf16 cast alone takes 9.5 ms)."""
    return torch.compile(_dequantize_int8, dynamic=False)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row dynamic fp8 activations: x [M, K] -> (xq [M, K] e4m3, a [M] fp32) with a = max|x_row| / 448."""
    a = _row_scale(x, FP8_MAX)
    return _round(x, a, "fp8"), a


def fake_quantize_fp8_rows(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values the fp8 path multiplies for x [M, K]: xq * a (in fp32, rounded once to `dtype`)."""
    xq, a = quantize_fp8_rows(x)
    return dequantize_weight(xq, a, dtype)


def reference_quantized_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                                w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                                method: str) -> torch.Tensor:
    """The fp32 oracle of the format: like reference_experts on the dequantised weights, with the activation
    rounded once to x's dtype and, for fp8, both GEMM inputs quantised per row. Ids outside [0, E) contribute
    nothing. Returns [T, H] fp32 (run with TF32 off for an fp32 oracle on the GPU)."""
    fp8 = _method(method) == "fp8"
    inter = w2.shape[2]
    xin = fake_quantize_fp8_rows(x) if fp8 else x.float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in experts.unique().tolist():
        if not 0 <= e < w13.shape[0]:
            continue
        tok, j = (experts == e).nonzero(as_tuple=True)
        h = xin[tok] @ dequantize_weight(w13[e], w13_scale[e]).t()
        act = (F.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype)
        act = fake_quantize_fp8_rows(act) if fp8 else act.float()
        out.index_add_(0, tok, (act @ dequantize_weight(w2[e], w2_scale[e]).t()) * weights[tok, j, None])
    return out


def scaled_grouped_mm_serves(dtype: torch.dtype, device: torch.device, hidden: int, inter: int) -> bool:
    """Whether torch._scaled_grouped_mm runs the fp8 products here: CUDA sm_90, bf16 activations (its only
    output dtype), every GEMM dim a multiple of 16."""
    return (hasattr(torch, "_scaled_grouped_mm") and device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) == (9, 0) and hidden % 16 == 0 and inter % 16 == 0)


def act_rows(h: torch.Tensor) -> torch.Tensor:
    """act = silu(g) * u of gate | up rows h [M, 2I], computed in fp32 and rounded once to h's dtype (the
    format's activation, as the fused kernels and cuda.fp8_rows compute it)."""
    inter = h.shape[1] // 2
    return (F.silu(h[:, :inter].float()) * h[:, inter:].float()).to(h.dtype)


def _fp8_rows(src: torch.Tensor, index: torch.Tensor | None = None, silu_mul: bool = False):
    """(xq, a) of src[index], or of act_rows(src) with silu_mul: one kernel on CUDA (cuda.fp8_rows, the same
    values), else the torch composition (7 passes over the rows, in fp32)."""
    if cuda.rows_serve(src) and src.dtype == torch.bfloat16 and src.shape[1] % (16 if silu_mul else 8) == 0:
        return cuda.fp8_rows(src, index, silu_mul)
    if silu_mul:
        src = act_rows(src)
    return quantize_fp8_rows(src if index is None else src[index])


def _scaled_grouped_mm(xq: torch.Tensor, a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                       offsets: torch.Tensor) -> torch.Tensor:
    """e4m3 rows xq [M, K] grouped by expert with their scales a [M], w [E, N, K] e4m3, w_scale [E, N] -> [M, N]
    bf16: a_r scale_c sum_k xq_rk q_ck in fp32 (torch wants B column-major: w^T's view)."""
    return torch._scaled_grouped_mm(xq, w.transpose(1, 2), a, w_scale, offs=offsets, out_dtype=torch.bfloat16)


def scaled_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                   w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                   foreign_ids: bool = False) -> torch.Tensor:
    """fp8 experts on e4m3 tensor cores (see scaled_grouped_mm_serves) -> [T, H] bf16."""
    return grouped_moe(x, experts, weights, w13.shape[0],
                       lambda x, rows, offs: _scaled_grouped_mm(*_fp8_rows(x, rows), w13, w13_scale, offs),
                       lambda h, offs: _scaled_grouped_mm(*_fp8_rows(h, silu_mul=True), w2, w2_scale, offs),
                       foreign_ids)


def dequantized_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                        w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, method: str,
                        foreign_ids: bool = False) -> torch.Tensor:
    """Dequantise, then the usual grouped math in x's dtype -> [T, H] in x's dtype. Each product dequantises
    its weights when it runs, so w13's copy is gone before w2's exists. For fp8 both GEMM inputs are quantised
    and dequantised per row first (the values the format multiplies, rounded to x's dtype)."""
    dt = x.dtype
    if _method(method) == "fp8":  # the activation as the e4m3 paths compute it (rounded once)
        def prepare(rows):
            return fake_quantize_fp8_rows(rows, dt)
        act = act_rows
    else:  # the bf16 path's activation: it is not quantised
        def prepare(rows):
            return rows
        act = silu_mul
    return grouped_moe(x, experts, weights, w13.shape[0],
                       lambda x, rows, offs: grouped_mm(prepare(x[rows]), dequantize_weight(w13, w13_scale, dt), offs),
                       lambda h, offs: grouped_mm(prepare(act(h)), dequantize_weight(w2, w2_scale, dt), offs),
                       foreign_ids)


def quantized_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                      w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, method: str,
                      foreign_ids: bool = False) -> torch.Tensor:
    """The torch path for any batch (see the module docstring): e4m3 tensor cores for fp8 where they serve,
    else dequantise-then-grouped-GEMM."""
    if method == "fp8" and scaled_grouped_mm_serves(x.dtype, x.device, w13.shape[2], w2.shape[2]):
        return scaled_experts(x, experts, weights, w13, w13_scale, w2, w2_scale, foreign_ids)
    return dequantized_experts(x, experts, weights, w13, w13_scale, w2, w2_scale, method, foreign_ids)


def quantized_capturable(method: str, hidden: int, inter: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether quantized_experts reads nothing on the host on this CUDA device (so a CUDA graph can capture it)."""
    if method == "fp8" and scaled_grouped_mm_serves(dtype, device, hidden, inter):
        return True
    return grouped_mm_capturable(hidden, inter, dtype, device)
