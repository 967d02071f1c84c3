"""The fused MoE expert kernels against the grouped-GEMM path and the fp32 reference (ops.moe.reference_experts).

GPU tier (`gpu` marker). Reference: per used expert, the routed tokens' x (rounded inputs) through w1/w3/w2 in
fp32 on the GPU (TF32 off), silu(g) * u in fp32, the top-k products weighted and summed in fp32. Tolerance:
max|error| / max|reference| <= 1e-2 against the fp32 reference and against the grouped-GEMM path (which rounds
g, u, silu(g) * u and y to bf16). The kernel keeps g, u and the down projection in fp32 and rounds only the
activation silu(g) * u (the second mma's operand) and the output to x's dtype: about 2^-9 relative each in bf16.
Routings include experts with no rows, experts chosen by many tokens (all tokens on two experts, whose rows
span several CTAs), ids outside [0, E) and a graph captured once and replayed with new routings.

The CPU tier (unmarked) checks that the module imports without the library, that SparseMoE keeps its torch
path on the CPU, and the grouped-GEMM path against the reference in fp32 (tolerance 1e-5 of max|reference|: the
two differ only in summation order over H = 256 and I = 320 products). On a machine with a GPU, unbuilt kernels
fail the GPU tier (tests/conftest.py), never skip it.
"""
import os
import subprocess
import sys
import types

import pytest
import torch

from minimax_m1.layers.moe import SparseMoE
from minimax_m1.ops.moe import FUSED_MAX_ROWS, cuda as moe_cuda, grouped_experts, reference_experts, use_fused
from util import rel_err

TOL = 1e-2
REAL = {"experts": 32, "hidden": 6144, "inter": 9216}
SMALL = {"experts": 8, "hidden": 256, "inter": 320}


def test_import_without_library():
    code = (
        "from minimax_m1.ops.moe import cuda as moe_cuda\n"
        "assert not moe_cuda.available()\n"
        "assert 'nonexistent' in moe_cuda.load_error()\n"
    )
    env = dict(os.environ, MINIMAX_M1_MOE_LIB="/nonexistent/libmoe.so")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_cpu_keeps_torch_path():
    moe = _module(SMALL, top_k=2, dtype=torch.float32, device="cpu")
    x = torch.randn(5, SMALL["hidden"])
    assert not use_fused(x, moe.w13, moe.w2, moe.top_k)
    weights, experts = moe.route(x)
    torch.testing.assert_close(moe(x), grouped_experts(x, experts, weights, moe.w13, moe.w2))


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_cpu_grouped_matches_reference(tokens):
    moe = _module(SMALL, top_k=2, dtype=torch.float32, device="cpu")
    x = torch.randn(tokens, SMALL["hidden"], generator=torch.Generator().manual_seed(tokens))
    weights, experts = moe.route(x)
    ref = reference_experts(x, experts, weights, moe.w13, moe.w2)
    assert rel_err(grouped_experts(x, experts, weights, moe.w13, moe.w2), ref) <= 1e-5


def _module(shape, top_k, dtype, device, seed=0):
    cfg = types.SimpleNamespace(num_local_experts=shape["experts"], hidden_size=shape["hidden"],
                                intermediate_size=shape["inter"], num_experts_per_tok=top_k)
    moe = SparseMoE(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p, fan_in in ((moe.gate.weight, shape["hidden"]), (moe.w13, shape["hidden"]), (moe.w2, shape["inter"])):
            p.data = (torch.randn(p.shape, generator=gen, device=device) * fan_in ** -0.5).to(dtype)
    return moe.requires_grad_(False)


@pytest.fixture(scope="module")
def real_moe():
    moe = _module(REAL, top_k=2, dtype=torch.bfloat16, device="cuda")
    yield moe
    del moe
    torch.cuda.empty_cache()


def _routing(moe, x, kind, gen):
    if kind == "router":
        return moe.route(x)
    t, k, e = x.shape[0], moe.top_k, moe.num_experts
    weights = torch.rand(t, k, generator=gen, device=x.device) + 0.1
    weights = weights / weights.sum(-1, keepdim=True)
    if kind == "two_experts":  # every token on experts 3 and e-2: two experts with T rows each
        experts = torch.tensor([3, e - 2] + list(range(k - 2)), device=x.device)[:k].expand(t, k).contiguous()
    elif kind == "invalid_ids":  # some choices point outside [0, E): they contribute nothing
        experts = torch.randint(0, e, (t, k), generator=gen, device=x.device)
        experts[::3, -1] = -1
        experts[1::4, 0] = e + 5
    else:
        raise ValueError(kind)
    return weights, experts


def _check(moe, tokens, kind="router", dtype=torch.bfloat16, row_tiles=0, ids_dtype=torch.int64, strided=False,
           seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h = moe.w13.shape[2]
    x = torch.randn(tokens, 2 * h if strided else h, generator=gen, device="cuda").to(dtype)
    if strided:
        x = x[:, h // 2: h // 2 + h]  # rows 2h apart, offset by h/2 elements
    weights, experts = _routing(moe, x, kind, gen)
    out = moe_cuda.moe_experts(x, experts.to(ids_dtype), weights, moe.w13, moe.w2, row_tiles=row_tiles)
    assert out.shape == x.shape and out.dtype == dtype
    ref = reference_experts(x, experts, weights, moe.w13, moe.w2)
    err, err_grouped = rel_err(out, ref), None
    assert err <= TOL, f"vs fp32 reference: {err:.2e}"
    if kind != "invalid_ids" and dtype == torch.bfloat16:
        grouped = grouped_experts(x, experts, weights, moe.w13, moe.w2)
        err_grouped = rel_err(out, grouped.float())
        assert err_grouped <= TOL, f"vs grouped GEMM: {err_grouped:.2e}"
        assert rel_err(grouped, ref) <= TOL  # the tolerance is one the torch path meets too
    return err, err_grouped


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 2, 7, 16, 64])
def test_real_shapes(real_moe, tokens):
    _check(real_moe, tokens, seed=tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,row_tiles", [(64, 0), (64, 1), (16, 2)])
def test_real_shapes_two_hot_experts(real_moe, tokens, row_tiles):
    _check(real_moe, tokens, kind="two_experts", row_tiles=row_tiles)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 2, 7, 16, 64, 200])
def test_small_shapes(dtype, tokens):
    moe = _module(SMALL, top_k=2, dtype=dtype, device="cuda", seed=1)
    _check(moe, tokens, dtype=dtype, seed=tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["two_experts_multipass", "invalid_ids", "int32_ids", "strided_x", "top3",
                                  "top1"])
def test_awkward_cases(case):
    top_k = {"top3": 3, "top1": 1}.get(case, 2)
    moe = _module(SMALL, top_k=top_k, dtype=torch.bfloat16, device="cuda", seed=2)
    if case == "two_experts_multipass":
        _check(moe, 37, kind="two_experts", row_tiles=1)  # 37 rows per expert: 5 CTAs of 8 rows per tile
    elif case == "invalid_ids":
        _check(moe, 13, kind="invalid_ids")
    elif case == "int32_ids":
        _check(moe, 9, ids_dtype=torch.int32)
    elif case == "strided_x":
        _check(moe, 6, strided=True)
    else:
        _check(moe, 11)


@pytest.mark.gpu
def test_empty_batch():
    moe = _module(SMALL, top_k=2, dtype=torch.bfloat16, device="cuda")
    x = torch.empty(0, SMALL["hidden"], dtype=torch.bfloat16, device="cuda")
    assert use_fused(x, moe.w13, moe.w2, moe.top_k)
    assert moe(x).shape == (0, SMALL["hidden"])


@pytest.mark.gpu
@pytest.mark.parametrize("shape,tokens", [("small", 16), ("real", 4)])
def test_cuda_graph_new_routing(real_moe, shape, tokens):
    """SparseMoE.forward captured once, replayed with new inputs (so new routings): equal to eager calls."""
    moe = real_moe if shape == "real" else _module(SMALL, top_k=2, dtype=torch.bfloat16, device="cuda", seed=3)
    h = moe.w13.shape[2]
    gen = torch.Generator(device="cuda").manual_seed(4)
    static_x = torch.randn(tokens, h, generator=gen, device="cuda").to(torch.bfloat16)
    assert use_fused(static_x, moe.w13, moe.w2, moe.top_k) and tokens * moe.top_k <= FUSED_MAX_ROWS
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        moe(static_x)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = moe(static_x)
    routings = set()
    for _ in range(3):
        x = torch.randn(tokens, h, generator=gen, device="cuda").to(torch.bfloat16)
        routings.add(tuple(moe.route(x)[1].flatten().tolist()))
        static_x.copy_(x)
        graph.replay()
        eager = moe(x)
        assert torch.equal(static_out, eager)  # deterministic kernels: bit-identical
        weights, experts = moe.route(x)
        assert rel_err(static_out, reference_experts(x, experts, weights, moe.w13, moe.w2)) <= TOL
    assert len(routings) == 3


# ---- rank shapes, the folded combine, tilings, 8-bit experts (issue 11 item 3, issue 16 item 2) ----
#
# Shapes: hidden 6144 with intermediate 9216 (full), 4608 (TP2 rank), 2304 (TP4), 1152 (TP8), E = 32, and
# E = 4 at 9216 (an EP8 rank); tokens 1, 2, 7, 8, 64, 128; routings from the router, skewed (a logit bias
# falling by 4 over the experts: hot experts span several CTAs), all tokens on two experts, and ids outside
# [0, E) (other ranks' experts under EP: -1 and E + 5) including tokens with no valid choice, whose output
# must be exact zeros. Before each call a NaN-filled block is freed into the caching allocator, so that
# workspaces and outputs start as NaN and an element nobody wrote fails rel_err (which requires finite values).
#
# 8-bit reference (`_reference_quantized`): the contract in fp64 (weights q * scale[row]; for fp8 the x rows
# and act rows quantised with fp32 semantics, a = max|row| / 448 and e4m3(row / a) via torch's cast after a
# clamp to +-448, then dequantised exactly); act = silu(g) * u rounded to bf16 as the kernel does. What the
# kernel adds beyond that: its fp32 accumulation (about 1e-6 relative at K <= 9216) and the final bf16 cast,
# <= 2^-9 of |y| <= 2^-9 max|y|; where fp32 and fp64 sums straddle a bf16 (or then e4m3) rounding boundary of
# an act element, that element differs by one ulp (2^-8, e4m3 2^-3 relative), a few per row, each weighed
# against a sum of I terms (<= 1e-3 of max|y| at I = 1152). TOL_QUANT = 2^-9 + 2e-3 ~ 4e-3.
# 16-bit weights keep TOL (1e-2, above) against the fp32 reference.
TOL_QUANT = 4e-3
H_FULL = 6144
RANK_SHAPES = [(32, 9216), (32, 4608), (32, 2304), (32, 1152), (4, 9216)]  # (experts, intermediate)
RANK_TOKENS = [1, 2, 7, 8, 64, 128]
KINDS = ["router", "skewed", "two_experts", "foreign"]
FORMATS = ["bf16", "experts_int8", "fp8"]
WEIGHT_DTYPES = {"experts_int8": torch.int8, "fp8": torch.float8_e4m3fn}


def _poison_allocator(nbytes: int = 64 << 20) -> None:
    torch.full((nbytes // 4,), float("nan"), device="cuda")  # freed at once: the next allocations reuse it


def _random_q(shape, method, gen):
    """Random 8-bit weights: int8 in [-127, 127] (+-127 included); e4m3 from a wide normal (|v| up to 448,
    subnormals included), NaN-free."""
    if method == "experts_int8":
        return torch.randint(-127, 128, shape, generator=gen, device="cuda", dtype=torch.int8)
    v = torch.randn(shape, generator=gen, device="cuda") * 64
    v.view(-1)[::997] = 448.0
    v.view(-1)[1::991] = 2.0 ** -9  # the smallest subnormal
    return v.clamp_(-448, 448).to(torch.float8_e4m3fn)


class Experts:
    """One layer's experts at (E, H, I) in bf16 and in both 8-bit formats (scales ~ fan_in^-1/2 / qmax)."""

    def __init__(self, e, h, i, seed=0):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.e, self.h, self.i = e, h, i
        self.bf16 = ((torch.randn(e, 2 * i, h, generator=gen, device="cuda") * h ** -0.5).to(torch.bfloat16),
                     (torch.randn(e, h, i, generator=gen, device="cuda") * i ** -0.5).to(torch.bfloat16))
        self.quant = {}
        for method, qmax in (("experts_int8", 127.0), ("fp8", 448.0)):
            w13, w2 = _random_q((e, 2 * i, h), method, gen), _random_q((e, h, i), method, gen)
            s13 = (torch.rand(e, 2 * i, generator=gen, device="cuda") + 0.5) * h ** -0.5 / qmax * 3
            s2 = (torch.rand(e, h, generator=gen, device="cuda") + 0.5) * i ** -0.5 / qmax * 3
            self.quant[method] = (w13, s13, w2, s2)


_EXPERTS: dict = {}


def _experts(e, i, h=H_FULL):
    """The experts of one shape, keeping one shape alive at a time (the full shape is 11 GB in bf16)."""
    if (e, h, i) not in _EXPERTS:
        _EXPERTS.clear()
        torch.cuda.empty_cache()
        _EXPERTS[(e, h, i)] = Experts(e, h, i)
    return _EXPERTS[(e, h, i)]


def _rank_routing(tokens, e, k, kind, gen):
    weights = torch.rand(tokens, k, generator=gen, device="cuda") + 0.1
    weights = weights / weights.sum(-1, keepdim=True)
    if kind in ("router", "skewed"):
        logits = torch.randn(tokens, e, generator=gen, device="cuda")
        if kind == "skewed":
            logits = logits + torch.linspace(4.0, 0.0, e, device="cuda")
        probs = torch.softmax(logits, -1)
        weights, experts = probs.topk(k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
    elif kind == "two_experts":
        experts = torch.tensor([min(3, e - 1), e - 2], device="cuda")[:k].expand(tokens, k).contiguous()
    elif kind == "foreign":  # ids of other ranks: -1 or >= E; token 0 has no valid choice at all
        experts = torch.randint(-1, e + 6, (tokens, k), generator=gen, device="cuda")
        experts[0] = torch.tensor([-1, e + 5], device="cuda")[:k]
    else:
        raise ValueError(kind)
    return weights, experts


def _fake_quant_rows(v: torch.Tensor) -> torch.Tensor:
    """The contract's per-row e4m3 activations, dequantised (fp64): a = max|row| / 448 in fp32 (1 for a zero
    row), e4m3(row / a) with fp32 division, round to nearest even, saturated."""
    amax = v.abs().amax(-1).float()
    a = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (v.float() / a[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.double() * a.double()[:, None]


def _reference_quantized(x, experts, weights, w13, s13, w2, s2, method):
    """8-bit experts by the contract in fp64 (act rounded to bf16 as the kernel does) -> [T, H] fp64."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for e in experts.unique().tolist():
        if not 0 <= e < w13.shape[0]:
            continue
        tok, j = (experts == e).nonzero(as_tuple=True)
        xin = _fake_quant_rows(x[tok]) if method == "fp8" else x[tok].double()
        h = xin @ (w13[e].double() * s13[e].double()[:, None]).t()
        act = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).to(torch.bfloat16)
        ain = _fake_quant_rows(act) if method == "fp8" else act.double()
        y = ain @ (w2[e].double() * s2[e].double()[:, None]).t()
        out.index_add_(0, tok, y * weights[tok, j, None].double())
    return out


def _run(ex, fmt, x, experts, weights, **knobs):
    _poison_allocator()
    if fmt == "bf16":
        return moe_cuda.moe_experts(x, experts, weights, *ex.bf16, **knobs)
    w13, s13, w2, s2 = ex.quant[fmt]
    return moe_cuda.moe_experts_quantized(x, experts, weights, w13, s13, w2, s2, fmt, **knobs)


def _reference(ex, fmt, x, experts, weights):
    if fmt == "bf16":
        return reference_experts(x, experts, weights, *ex.bf16)
    return _reference_quantized(x, experts, weights, *ex.quant[fmt], fmt)


def _check_rank(ex, fmt, tokens, kind, seed, **knobs):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, ex.h, generator=gen, device="cuda").to(torch.bfloat16)
    weights, experts = _rank_routing(tokens, ex.e, 2, kind, gen)
    out = _run(ex, fmt, x, experts, weights, **knobs)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    if kind == "foreign":
        assert torch.equal(out[0], torch.zeros_like(out[0])), "a token without a valid choice must be zeros"
    ref = _reference(ex, fmt, x, experts, weights)
    err = rel_err(out, ref)
    tol = TOL if fmt == "bf16" else TOL_QUANT
    assert err <= tol, f"{fmt} E={ex.e} I={ex.i} T={tokens} {kind}: {err:.2e} > {tol:.0e}"
    return x, experts, weights, out


def _rank_cases():
    """(E, I, tokens, kind, format), one shape after the other (one shape's weights alive at a time)."""
    cases = []
    for e, i in RANK_SHAPES:
        for tokens in RANK_TOKENS:
            for kind in KINDS:
                if kind == "two_experts" and tokens not in (8, 128):
                    continue
                for fmt in FORMATS:
                    cases.append((e, i, tokens, kind, fmt))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("e,i,tokens,kind,fmt", _rank_cases())
def test_rank_shapes(e, i, tokens, kind, fmt):
    _check_rank(_experts(e, i), fmt, tokens, kind, seed=tokens * 31 + i)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("e,i,tokens", [(32, 1152, 1), (32, 1152, 64), (4, 9216, 128), (32, 9216, 8)])
def test_tilings_are_bit_identical(e, i, tokens, fmt):
    """Tiles per CTA, L2 prefetch and PDL change where and when the sums are made, never their order: the
    outputs are bit-identical (and right). 8 gate/up warps split K differently: equal within rounding."""
    ex = _experts(e, i)
    x, experts, weights, base = _check_rank(ex, fmt, tokens, "router", seed=5)
    for knobs in ({"up_tiles": 1, "down_tiles": 1, "prefetch": 0}, {"up_tiles": 3, "down_tiles": 5, "prefetch": 4},
                  {"up_tiles": 1000, "down_tiles": 1000}, {"pdl": False}, {"row_tiles": 4}):
        if "row_tiles" in knobs and tokens < 8:
            continue
        out = _run(ex, fmt, x, experts, weights, **knobs)  # row_tiles: other work items, the same sums per row
        assert torch.equal(out, base), knobs
    for warps in (4, 8):
        out = _run(ex, fmt, x, experts, weights, up_warps=warps)
        assert rel_err(out, base.float()) <= (TOL if fmt == "bf16" else TOL_QUANT)
    again = _run(ex, fmt, x, experts, weights)
    assert torch.equal(again, base), "not deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["experts_int8", "fp8"])
@pytest.mark.parametrize("tokens", [1, 2, 7, 16, 64, 200])
def test_quantized_small_shapes(fmt, tokens):
    """Small sizes (H 256, I 384: three 128-element blocks), odd token counts, top-1/2/3 via the routing."""
    ex = Experts(8, 256, 384, seed=tokens)
    _check_rank(ex, fmt, tokens, "router", seed=tokens)
    _check_rank(ex, fmt, tokens, "foreign", seed=tokens + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["experts_int8", "fp8"])
def test_quantized_zero_and_extreme_rows(fmt):
    """fp8's per-row scales at their edges: an all-zero x row (a = 1, output exactly 0) and rows of very large
    and very small magnitude (the scale follows; the relative error does not change)."""
    ex = Experts(8, 256, 384, seed=9)
    gen = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn(6, 256, generator=gen, device="cuda")
    x[0] = 0
    x[1] *= 1e4
    x[2] *= 1e-6
    x = x.to(torch.bfloat16)
    weights, experts = _rank_routing(6, ex.e, 2, "router", gen)
    out = _run(ex, fmt, x, experts, weights)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    ref = _reference(ex, fmt, x, experts, weights)
    for r in range(1, 6):  # each row against its own magnitude
        assert rel_err(out[r:r + 1], ref[r:r + 1]) <= TOL_QUANT, r


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_graph_replay_new_routing(fmt):
    """Captured once, replayed with new inputs and routings: equal to eager calls, bit for bit."""
    ex = _experts(32, 1152)
    gen = torch.Generator(device="cuda").manual_seed(11)
    tokens = 8
    static_x = torch.randn(tokens, ex.h, generator=gen, device="cuda").to(torch.bfloat16)
    static_w, static_e = _rank_routing(tokens, ex.e, 2, "router", gen)

    def step():
        if fmt == "bf16":
            return moe_cuda.moe_experts(static_x, static_e, static_w, *ex.bf16)
        w13, s13, w2, s2 = ex.quant[fmt]
        return moe_cuda.moe_experts_quantized(static_x, static_e, static_w, w13, s13, w2, s2, fmt)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for kind in ("router", "foreign", "skewed"):
        x = torch.randn(tokens, ex.h, generator=gen, device="cuda").to(torch.bfloat16)
        w, e = _rank_routing(tokens, ex.e, 2, kind, gen)
        static_x.copy_(x), static_w.copy_(w), static_e.copy_(e)
        graph.replay()
        assert torch.equal(static_out, _run(ex, fmt, x, e, w)), kind


@pytest.mark.gpu
def test_quantized_bad_inputs_name_the_fix():
    ex = Experts(4, 256, 384, seed=1)
    x = torch.randn(3, 256, device="cuda").to(torch.bfloat16)
    weights, experts = _rank_routing(3, 4, 2, "router", torch.Generator(device="cuda").manual_seed(1))
    w13, s13, w2, s2 = ex.quant["experts_int8"]
    with pytest.raises(ValueError, match="method"):
        moe_cuda.moe_experts_quantized(x, experts, weights, w13, s13, w2, s2, "int4")
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        moe_cuda.moe_experts_quantized(x, experts, weights, w13, s13, w2, s2, "fp8")
    with pytest.raises(ValueError, match="bfloat16"):
        moe_cuda.moe_experts_quantized(x.half(), experts, weights, w13, s13, w2, s2, "experts_int8")
    with pytest.raises(ValueError, match="w13_scale"):
        moe_cuda.moe_experts_quantized(x, experts, weights, w13, s13[:, :10], w2, s2, "experts_int8")
    small = Experts(4, 192, 384, seed=2)  # H 192: a multiple of 64, not of 128
    x192 = torch.randn(3, 192, device="cuda").to(torch.bfloat16)
    assert not moe_cuda.supports_quantized(x192, small.quant["fp8"][0], small.quant["fp8"][2], 2, "fp8")
    with pytest.raises(ValueError, match="multiples of 128"):
        moe_cuda.moe_experts_quantized(x192, experts, weights, *small.quant["fp8"], "fp8")
    assert moe_cuda.supports_quantized(x, w13, w2, 2, "experts_int8")
    assert not moe_cuda.supports_quantized(x, w13, w2, 2, "fp8")  # int8 weights are not fp8's


@pytest.mark.gpu
def test_plan_fills_every_sm():
    """The automatic plan at batch 1 on the TP8 rank: every CTA of both kernels resident at once, and the
    narrow gate/up grid (72 tiles x 2 experts) on 8 warps where that fits."""
    p = moe_cuda.plan(1, 2, 32, H_FULL, 1152)
    assert p["row_tiles"] == 1 and p["items"] == 2 and p["up_tiles"] == 1
    assert p["up_warps"] in (4, 8) and p["down_tiles"] >= 1 and p["prefetch"] >= 0
    wide = moe_cuda.plan(128, 2, 32, H_FULL, 9216, method="fp8")
    assert wide["up_tiles"] >= 1 and wide["down_tiles"] >= 1


def test_quantized_cpu_surface():
    """Without a GPU: the 8-bit entry checks the method first, and supports_quantized is False on the CPU."""
    x = torch.randn(2, 256).to(torch.bfloat16)
    w13 = torch.zeros(4, 768, 256, dtype=torch.int8)
    w2 = torch.zeros(4, 256, 384, dtype=torch.int8)
    assert not moe_cuda.supports_quantized(x, w13, w2, 2, "experts_int8")
    with pytest.raises(ValueError, match="method must be one of"):
        moe_cuda.moe_experts_quantized(x, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2), w13,
                                       torch.ones(4, 768), w2, torch.ones(4, 256), "int4")
