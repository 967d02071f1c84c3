"""Binding of the fused MoE expert kernels for small token counts (csrc/moe/, exported through apache-tvm-ffi).

The shared library is `$MINIMAX_M1_MOE_LIB` when set, else `minimax_m1/_kernels/libmoe.so` (built by
`pip install`). It is loaded on first use; importing this module never fails: without the library, tvm_ffi or a
CUDA device, `available()` is False and callers keep the grouped-GEMM path. What the kernels serve (dtypes, the
most rows and experts of one call, the size multiples, the 8-bit formats) is the library's `moe_limits()`.

`moe_experts` and `moe_experts_quantized` are torch custom ops (`minimax_m1::moe_experts`,
`minimax_m1::moe_experts_quantized`) with fake implementations, so torch.compile and CUDA graphs see through
them; eager calls skip the dispatcher (`_library.custom_op`). They run on torch's current stream, never read
device memory on the host, and take their workspaces from torch's caching allocator (inside a graph capture,
from the graph's pool): the routing is read on the device, so a captured call stays right for any routing.

Each used expert's weights are streamed once (an expert with more routed rows than one CTA takes, see
`row_tiles`, once per group of rows), by two kernels: gate/up mma tiles writing act = silu(x w1^T) * (x w3^T)
(fp32 accumulation, act rounded once to x's dtype), and down tiles writing each (token, choice) row's fp32
result, whose last writer per token and 16-row chunk sums the top-k rows with their fp32 routing weights in
choice order and casts once (deterministic). 8-bit weights (method "experts_int8": int8, W8A16; "fp8": e4m3,
W8A8 with per-row activation scales, which adds two small quantisation kernels) carry per-output-channel fp32
scales; see moe_experts_quantized.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _library
from .._library import KernelLibrary, custom_op

_LIBRARY = KernelLibrary("libmoe.so", "MINIMAX_M1_MOE_LIB", "moe_limits")
_load, available, load_error, limits = _LIBRARY.load, _LIBRARY.available, _LIBRARY.load_error, _LIBRARY.limits

QUANTIZED_METHODS = ("experts_int8", "fp8")


def serves(num_experts: int, hidden: int, inter: int, rows: int, dtype: torch.dtype) -> bool:
    """Whether the built kernels serve these sizes (rows = tokens * top_k) in this dtype (False without the
    library)."""
    lim = _LIBRARY.limits_if_loaded()
    return (lim is not None and dtype in lim["dtypes"] and _sizes_ok(lim, num_experts, hidden, inter, rows,
                                                                      lim["size_multiple"]))


def _sizes_ok(lim: dict, num_experts: int, hidden: int, inter: int, rows: int, multiple: int) -> bool:
    return (hidden % multiple == 0 and inter % multiple == 0 and inter > 0 and hidden > 0
            and 1 <= num_experts <= lim["max_experts"] and rows <= lim["max_rows"])


def serves_quantized(num_experts: int, hidden: int, inter: int, rows: int, dtype: torch.dtype, method: str,
                     device: torch.device | None = None) -> bool:
    """Whether the built kernels serve 8-bit experts of `method` ("experts_int8" or "fp8") at these sizes with
    activations in `dtype` (and, given a CUDA device, on it: fp8 needs compute capability `fp8_min_arch`)."""
    lim = _LIBRARY.limits_if_loaded()
    if lim is None or method not in QUANTIZED_METHODS or dtype not in lim["quantized_dtypes"]:
        return False
    if method == "fp8" and device is not None:
        major, minor = torch.cuda.get_device_capability(device)
        if 10 * major + minor < lim["fp8_min_arch"]:
            return False
    return _sizes_ok(lim, num_experts, hidden, inter, rows, lim["quantized_size_multiple"])


def _shapes_ok(x: Tensor, w13: Tensor, w2: Tensor) -> tuple[int, int, int] | None:
    """(E, H, I) when x [T, H], w13 [E, 2I, H] and w2 [E, H, I] fit together on x's CUDA device, contiguous."""
    if not (x.is_cuda and x.dim() == 2 and w13.dim() == 3 and w2.dim() == 3):
        return None
    e, two_i, h = w13.shape
    i = two_i // 2
    ok = (w13.device == x.device and w2.device == x.device and x.shape[1] == h and tuple(w2.shape) == (e, h, i)
          and two_i == 2 * i and w13.is_contiguous() and w2.is_contiguous())
    return (e, h, i) if ok else None


def supports(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int) -> bool:
    """Whether the kernels handle these shapes and dtypes (else the caller keeps its torch path)."""
    sizes = _shapes_ok(x, w13, w2)
    return (sizes is not None and w13.dtype == x.dtype and w2.dtype == x.dtype
            and serves(*sizes, x.shape[0] * top_k, x.dtype))


def supports_quantized(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int, method: str) -> bool:
    """Whether the kernels handle 8-bit experts of `method` with these shapes and dtypes (w13 and w2 in the
    method's weight dtype, x in a dtype they take, the device able to run it); the scales are checked by the
    call."""
    sizes = _shapes_ok(x, w13, w2)
    if sizes is None or not serves_quantized(*sizes, x.shape[0] * top_k, x.dtype, method, x.device):
        return False
    weight_dtypes = limits()[f"{method}_weight_dtypes"]
    return w13.dtype in weight_dtypes and w2.dtype in weight_dtypes


def _workspaces(x: Tensor, rows: int, inter: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, act, partial, counters) for one call."""
    tokens, hidden = x.shape
    out = torch.empty_like(x)
    act = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
    partial = torch.empty((rows, hidden), dtype=torch.float32, device=x.device)
    counters = torch.empty(tokens * (hidden // limits()["tile_rows"]), dtype=torch.int32, device=x.device)
    return out, act, partial, counters


def _moe_experts_impl(x: Tensor, experts: Tensor, weights: Tensor, w13: Tensor, w2: Tensor, row_tiles: int,
                      up_warps: int, up_tiles: int, down_tiles: int, prefetch: int, pdl: bool) -> Tensor:
    out, act, partial, counters = _workspaces(x, x.shape[0] * experts.shape[1], w2.shape[2])
    _load().moe_experts(x, experts, weights, w13, w2, act, partial, counters, out, row_tiles, up_warps, up_tiles,
                        down_tiles, prefetch, pdl)
    return out


def _moe_experts_fake(x, experts, weights, w13, w2, row_tiles, up_warps, up_tiles, down_tiles, prefetch, pdl):
    return torch.empty_like(x)


_moe_experts_op = custom_op("minimax_m1::moe_experts", _moe_experts_impl, _moe_experts_fake)


def _moe_experts_quantized_impl(x: Tensor, experts: Tensor, weights: Tensor, w13: Tensor, w13_scale: Tensor,
                                w2: Tensor, w2_scale: Tensor, method: str, row_tiles: int, up_warps: int,
                                up_tiles: int, down_tiles: int, prefetch: int, pdl: bool) -> Tensor:
    tokens, hidden = x.shape
    rows, inter = tokens * experts.shape[1], w2.shape[2]
    out, act, partial, counters = _workspaces(x, rows, inter)
    if method == "fp8":  # the per-row e4m3 activations (held as fp16) and their scales
        xq = torch.empty((tokens, hidden), dtype=torch.float16, device=x.device)
        actq = torch.empty((rows, inter), dtype=torch.float16, device=x.device)
        scales = torch.empty(tokens + rows, dtype=torch.float32, device=x.device)
    else:
        xq = actq = scales = torch.empty(0, dtype=torch.float32, device=x.device)
    _load().moe_experts_quantized(x, experts, weights, w13, w13_scale, w2, w2_scale, method, act, partial, counters,
                                  xq, actq, scales, out, row_tiles, up_warps, up_tiles, down_tiles, prefetch, pdl)
    return out


def _moe_experts_quantized_fake(x, experts, weights, w13, w13_scale, w2, w2_scale, method, row_tiles, up_warps,
                                up_tiles, down_tiles, prefetch, pdl):
    return torch.empty_like(x)


_moe_experts_quantized_op = custom_op("minimax_m1::moe_experts_quantized", _moe_experts_quantized_impl,
                                      _moe_experts_quantized_fake)


def _inputs(x: Tensor, experts: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    align = limits()["row_align_bytes"]
    if x.stride(-1) != 1 or x.data_ptr() % align or (x.shape[0] > 1 and x.stride(0) % (align // x.element_size())):
        x = x.clone(memory_format=torch.contiguous_format)  # a fresh, aligned allocation
    experts = experts.contiguous()
    if experts.dtype not in (torch.int32, torch.int64):
        experts = experts.long()
    return x, experts, weights.to(torch.float32).contiguous()


def moe_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                row_tiles: int = 0, pdl: bool | None = None, up_warps: int = 0, up_tiles: int = 0,
                down_tiles: int = 0, prefetch: int = -1) -> torch.Tensor:
    """Routed experts of a sparse MoE layer for small token counts.

    x [T, H] bf16/fp16; experts [T, k] int32/int64 expert ids (ids outside [0, E) contribute nothing);
    weights [T, k] routing weights (computed in fp32); w13 [E, 2I, H] (rows 0..I-1 gate w1, I..2I-1 up w3) and
    w2 [E, H, I], x's dtype, contiguous; H and I multiples of 64, T * k <= 1024, E <= 256 (`limits()`,
    see `supports`).
    Returns [T, H] in x's dtype: sum_j weights[t, j] * w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t])), e =
    experts[t, j], with fp32 accumulation; the activation is rounded to x's dtype once, the k products are
    summed in fp32 in choice order and the sum is cast once (deterministic, the same for every tiling).
    Tuning (0: automatic; `plan` says what automatic picks): `row_tiles`, routed rows per CTA in units of 8
    (1, 2 or 4; an expert with more rows reads its weights once more per extra group of rows); `up_warps` (4
    or 8) per gate/up CTA; `up_tiles` / `down_tiles`, 16-row weight tiles per CTA of each kernel; `prefetch`,
    L2 prefetch distance in row blocks (-1 automatic, 0 none). `pdl` False launches the kernels one after the
    other (no programmatic dependent launch; None: the MINIMAX_M1_MOE_PDL switch).
    """
    x, experts, weights = _inputs(x, experts, weights)
    pdl = _library.MOE_PDL if pdl is None else bool(pdl)
    return _moe_experts_op(x, experts, weights, w13, w2, int(row_tiles), int(up_warps), int(up_tiles),
                           int(down_tiles), int(prefetch), pdl)


def moe_experts_quantized(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                          w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, method: str,
                          row_tiles: int = 0, pdl: bool | None = None, up_warps: int = 0, up_tiles: int = 0,
                          down_tiles: int = 0, prefetch: int = -1) -> torch.Tensor:
    """Routed experts with 8-bit weights, for small token counts (see `supports_quantized`).

    x [T, H] bf16; experts, weights as for `moe_experts`; w13 [E, 2I, H] and w2 [E, H, I] int8 (method
    "experts_int8") or float8_e4m3fn ("fp8"), contiguous, with fp32 per-output-channel scales w13_scale [E, 2I]
    and w2_scale [E, H]: the weight is q * scale[row]. H and I multiples of 128.
    experts_int8 (W8A16): y_c = scale_c * sum_k x_k q_ck in fp32. fp8 (W8A8): each x row and each act row is
    quantised first, a = max|row| / 448 (1 for a zero row) and rowq = e4m3(row / a) (IEEE fp32 division, round
    to nearest even, saturating), then y_c = a * scale_c * sum_k rowq_k q_ck in fp32 (e4m3 values are exact in
    the fp16 the tensor cores take). act = silu(g) * u is rounded to bf16 once, as in `moe_experts`, before its
    quantisation. Returns [T, H] bf16; routing, fp32 routing weights and combine as `moe_experts`; the tuning
    arguments are `moe_experts`'.
    """
    if method not in QUANTIZED_METHODS:
        raise ValueError(f"method must be one of {', '.join(QUANTIZED_METHODS)}, got {method!r}")
    x, experts, weights = _inputs(x, experts, weights)
    w13_scale = w13_scale.to(torch.float32).contiguous()
    w2_scale = w2_scale.to(torch.float32).contiguous()
    pdl = _library.MOE_PDL if pdl is None else bool(pdl)
    return _moe_experts_quantized_op(x, experts, weights, w13, w13_scale, w2, w2_scale, method, int(row_tiles),
                                     int(up_warps), int(up_tiles), int(down_tiles), int(prefetch), pdl)


def plan(tokens: int, top_k: int, num_experts: int, hidden: int, inter: int, method: str | None = None,
         dtype: torch.dtype = torch.bfloat16, device: int = 0, row_tiles: int = 0, up_warps: int = 0,
         up_tiles: int = 0, down_tiles: int = 0, prefetch: int = -1) -> dict:
    """What a call with these sizes runs on CUDA device `device` (the automatic choices filled in): a dict of
    row_tiles, up_warps, up_tiles, down_tiles, prefetch and items (the bound on work items the grids take)."""
    names = ("row_tiles", "up_warps", "up_tiles", "down_tiles", "prefetch", "items")
    values = _load().moe_plan(tokens, top_k, num_experts, hidden, inter, method or "", str(dtype).split(".")[-1],
                              row_tiles, up_warps, up_tiles, down_tiles, prefetch, device)
    return dict(zip(names, (int(v) for v in values)))


# ---- row kernels of the large-batch path (csrc/moe/rows.cu) ----

def rows_serve(t: Tensor) -> bool:
    """Whether fp8_rows and combine_rows run for rows like t (a CUDA tensor, the library loaded, fused ops on);
    the callers keep their torch compositions otherwise."""
    return t.is_cuda and _library.FUSED_OPS and _LIBRARY.limits_if_loaded() is not None


def _fp8_rows_impl(src: Tensor, index: Tensor, cols: int, silu_mul: bool) -> tuple[Tensor, Tensor]:
    rows = index.shape[0] if index.numel() else src.shape[0]
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=src.device)
    a = torch.empty(rows, dtype=torch.float32, device=src.device)
    _load().moe_fp8_rows(src, index, q, a, silu_mul)
    return q, a


def _fp8_rows_fake(src, index, cols, silu_mul):
    rows = index.shape[0] if index.numel() else src.shape[0]
    return (src.new_empty((rows, cols), dtype=torch.float8_e4m3fn), src.new_empty(rows, dtype=torch.float32))


_fp8_rows_op = custom_op("minimax_m1::moe_fp8_rows", _fp8_rows_impl, _fp8_rows_fake)


def fp8_rows(src: Tensor, index: Tensor | None = None, silu_mul: bool = False) -> tuple[Tensor, Tensor]:
    """Per-row e4m3 quantisation in one kernel (see quantized.quantize_fp8_rows, bit-identical): of src[index]
    (index int64; None: src itself), or with silu_mul of bf16(silu(g) * u) for src = gate | up rows (computed
    in fp32, rounded once). src bf16 -> (q [R, C] float8_e4m3fn, a [R] fp32)."""
    if src.stride(-1) != 1 or src.data_ptr() % 16 or (src.shape[0] > 1 and src.stride(0) % 8):
        src = src.contiguous()
    cols = src.shape[1] // 2 if silu_mul else src.shape[1]
    idx = index.contiguous() if index is not None else src.new_empty(0, dtype=torch.int64)
    return _fp8_rows_op(src, idx, int(cols), bool(silu_mul))


def _combine_impl(y: Tensor, pos: Tensor, weights: Tensor) -> Tensor:
    out = torch.empty((pos.shape[0], y.shape[1]), dtype=y.dtype, device=y.device)
    _load().moe_combine(y, pos, weights, out)
    return out


def _combine_fake(y, pos, weights):
    return y.new_empty((pos.shape[0], y.shape[1]))


_combine_op = custom_op("minimax_m1::moe_combine", _combine_impl, _combine_fake)


def combine_rows(y: Tensor, pos: Tensor, weights: Tensor) -> Tensor:
    """out[t] = sum_j weights[t, j] y[pos[t, j]] in fp32 (pos < 0: nothing), cast once to y's dtype; y [M, H]
    bf16/fp16, pos [T, k] int64, weights [T, k] fp32 -> [T, H]."""
    return _combine_op(y.contiguous(), pos.contiguous(), weights.to(torch.float32).contiguous())
