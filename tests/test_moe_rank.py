"""The fused MoE kernels at MiniMax-M1's full and per-rank shapes, their tilings, and 8-bit experts (issue 11
item 3, issue 16 item 2); tests/test_moe_cuda.py has the original bf16 tests at the full shape and small sizes.

Shapes: hidden 6144 with intermediate 9216 (full), 4608 (TP2 rank), 2304 (TP4), 1152 (TP8), E = 32, and
E = 4 at 9216 (an EP8 rank); tokens 1, 2, 7, 8, 64, 128; routings from the router, skewed (a logit bias
falling by 4 over the experts: hot experts span several CTAs), all tokens on two experts, and ids outside
[0, E) (other ranks' experts under EP: -1 and E + 5) including tokens with no valid choice, whose output
must be exact zeros. Before each call a NaN-filled block is freed into the caching allocator, so that
workspaces and outputs start as NaN and an element nobody wrote fails the check (which requires finite values).

8-bit reference (`_reference_quantized`): the contract in fp64 (weights q * scale[row]; for fp8 the x rows
and act rows quantised with fp32 semantics, a = max|row| / 448 and e4m3(row / a) via torch's cast after a
clamp to +-448, then dequantised exactly); act = silu(g) * u rounded to bf16 as the kernel does. What the
kernel adds beyond that: its fp32 accumulation (about 1e-6 relative at K <= 9216) and the final bf16 cast,
at most half an ulp, 2^-8 |y| <= 2^-8 max|y| (bf16 keeps 8 significant bits); where fp32 and fp64 sums
straddle a bf16 (or then e4m3) rounding boundary of an act element, that element differs by one ulp (<= 2^-7,
e4m3 2^-3 relative), a few per row, each weighed against a sum of I terms (<= 1e-3 of max|y| at I = 1152, 2e-3
allowed). TOL_QUANT = 2^-8 + 2e-3 ~ 5.9e-3. Two kernel outputs that sum in different orders (4 or 8 gate/up
warps) may round apart by one bf16 ulp of the output, 2^-7 max|y|: TOL_PAIR = 2^-7 + 2e-3 ~ 9.8e-3. For fp8,
tokens with a row whose e4m3 grid the contract leaves to fp32 rounding (see _ambiguous_grid; rare), and at
most one token in 64 beyond what that detects (_flips_allowed), are held to TOL_AMBIGUOUS = 3e-2 instead, in
both comparisons.
16-bit weights keep TOL (1e-2, as tests/test_moe_cuda.py) against the fp32 reference.
"""
import pytest
import torch

from minimax_m1.ops.moe import cuda as moe_cuda, reference_experts
from minimax_m1.timing import capture_graph

TOL = 1e-2
TOL_QUANT = 2 ** -8 + 2e-3
TOL_PAIR = 2 ** -7 + 2e-3
TOL_AMBIGUOUS = 3e-2
H_FULL = 6144
RANK_SHAPES = [(32, 9216), (32, 4608), (32, 2304), (32, 1152), (4, 9216)]  # (experts, intermediate)
RANK_TOKENS = [1, 2, 7, 8, 64, 128]
KINDS = ["router", "skewed", "two_experts", "foreign"]
FORMATS = ["bf16", "experts_int8", "fp8"]


def _poison_allocator(nbytes: int = 64 << 20) -> None:
    """NaN-filled blocks freed into the caching allocator's large and small (<= 1 MB) pools, which the next
    allocations reuse."""
    blocks = [torch.full((nbytes // 4,), float("nan"), device="cuda")]
    blocks += [torch.full(((512 << 10) // 4,), float("nan"), device="cuda") for _ in range(16)]
    del blocks


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
    a = torch.where(amax > 0, amax / torch.full_like(amax, 448.0), torch.ones_like(amax))  # IEEE, see _row_scale
    q = (v.float() / a[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.double() * a.double()[:, None]


def _ambiguous_grid(act: torch.Tensor) -> torch.Tensor:
    """act [n, I] fp64 before its bf16 rounding -> [n] bool: rows whose per-row e4m3 grid the contract leaves
    open to fp32 rounding. An element within 1e-4 relative (far above fp32 accumulation error) of a bf16
    rounding midpoint may round either way in a correct kernel; if it is one of the row's largest (within 2^-6
    of max|act|), it may set amax, so a = amax / 448 moves by one bf16 ulp and about 1/16 of the row's
    elements land one e4m3 step apart: up to ~1e-2 of max|y| for that row, which no rounding argument bounds
    tighter."""
    mag = act.abs()
    e = torch.floor(torch.log2(mag.clamp_min(1e-300)))
    half_ulp = torch.exp2(e - 8)
    off = (act - act.to(torch.bfloat16).double()).abs()
    near_midpoint = (half_ulp - off).abs() < 1e-4 * mag
    near_max = mag >= mag.amax(-1, keepdim=True) * (1 - 2 ** -6)
    return (near_midpoint & near_max).any(-1)


def _reference_quantized(x, experts, weights, w13, s13, w2, s2, method):
    """8-bit experts by the contract in fp64 (act rounded to bf16 as the kernel does) -> ([T, H] fp64, [T]
    bool: tokens with a row whose e4m3 grid is ambiguous, see _ambiguous_grid; all False for int8)."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    ambiguous = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for e in experts.unique().tolist():
        if not 0 <= e < w13.shape[0]:
            continue
        tok, j = (experts == e).nonzero(as_tuple=True)
        xin = _fake_quant_rows(x[tok]) if method == "fp8" else x[tok].double()
        h = xin @ (w13[e].double() * s13[e].double()[:, None]).t()
        act64 = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        act = act64.to(torch.bfloat16)
        if method == "fp8":
            ambiguous[tok[_ambiguous_grid(act64)]] = True
        ain = _fake_quant_rows(act) if method == "fp8" else act.double()
        y = ain @ (w2[e].double() * s2[e].double()[:, None]).t()
        out.index_add_(0, tok, y * weights[tok, j, None].double())
    return out, ambiguous


def _reference(ex, fmt, x, experts, weights):
    """-> (reference [T, H], [T] bool tokens checked at TOL_AMBIGUOUS)."""
    if fmt == "bf16":
        return reference_experts(x, experts, weights, *ex.bf16), torch.zeros(x.shape[0], dtype=torch.bool)
    return _reference_quantized(x, experts, weights, *ex.quant[fmt], fmt)


def _flips_allowed(fmt: str, tokens: int) -> int:
    """fp8 tokens beyond _ambiguous_grid's reach whose e4m3 grid may still flip: its 1e-4 window covers fp32
    sums that cancel little; a gate/up sum over 6144 terms that cancels more is farther from fp64, and the
    row's amax element can then round to the other bf16 neighbour. Measured on an H200 at T=128 with two
    experts: one token of 128 at I = 1152 (1.5e-2) and at 4608 (1.0e-2), under 2e-3 with 8 gate/up warps
    (another K split), so an order effect, not the kernel's. One token in 64 (at least one), each held to
    TOL_AMBIGUOUS; none for the other formats."""
    return max(1, tokens // 64) if fmt == "fp8" else 0


def _assert_close(out, ref, ambiguous, tol, what, flips=0):
    """rel_err within tol over the tokens, the ambiguous ones (fp8 only) and at most `flips` others (see
    _flips_allowed) within TOL_AMBIGUOUS, all against max|ref| of the whole output."""
    scale = ref.double().abs().max().clamp_min(1e-30)
    err = (out.double() - ref.double()).abs().amax(-1) / scale
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    amb = ambiguous.to(err.device)
    over = (~amb) & (err > tol)
    if 0 < over.sum().item() <= flips:
        assert err[over].max().item() <= TOL_AMBIGUOUS, f"{what}: {err[over].max().item():.2e} > {TOL_AMBIGUOUS:.1e}"
        amb = amb | over
    clear = err[~amb].max().item() if (~amb).any() else 0.0
    assert clear <= tol, f"{what}: {clear:.2e} > {tol:.1e} ({over.sum().item()} tokens over)"
    if amb.any():
        assert err[amb].max().item() <= TOL_AMBIGUOUS, f"{what}: ambiguous-grid tokens {err[amb].max().item():.2e}"
    return clear


def _run(ex, fmt, x, experts, weights, **knobs):
    _poison_allocator()
    if fmt == "bf16":
        return moe_cuda.moe_experts(x, experts, weights, *ex.bf16, **knobs)
    w13, s13, w2, s2 = ex.quant[fmt]
    return moe_cuda.moe_experts_quantized(x, experts, weights, w13, s13, w2, s2, fmt, **knobs)


def _check_rank(ex, fmt, tokens, kind, seed, **knobs):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, ex.h, generator=gen, device="cuda").to(torch.bfloat16)
    weights, experts = _rank_routing(tokens, ex.e, 2, kind, gen)
    out = _run(ex, fmt, x, experts, weights, **knobs)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    if kind == "foreign":
        assert torch.equal(out[0], torch.zeros_like(out[0])), "a token without a valid choice must be zeros"
    ref, ambiguous = _reference(ex, fmt, x, experts, weights)
    _assert_close(out, ref, ambiguous, TOL if fmt == "bf16" else TOL_QUANT,
                  f"{fmt} E={ex.e} I={ex.i} T={tokens} {kind}", _flips_allowed(fmt, tokens))
    return x, experts, weights, out, ambiguous


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
    x, experts, weights, base, ambiguous = _check_rank(ex, fmt, tokens, "router", seed=5)
    warps = moe_cuda.plan(tokens, 2, e, ex.h, i, method=None if fmt == "bf16" else fmt)["up_warps"]
    for knobs in ({"up_tiles": 1, "down_tiles": 1, "prefetch": 0}, {"up_tiles": 3, "down_tiles": 5, "prefetch": 4},
                  {"up_tiles": 1000, "down_tiles": 1000}, {"pdl": False}, {"row_tiles": 4}):
        if "row_tiles" in knobs and tokens < 8:
            continue
        # row_tiles: other work items, the same sums per row (the warps pinned: they set the K split)
        out = _run(ex, fmt, x, experts, weights, up_warps=warps, **knobs)
        assert torch.equal(out, base), knobs
    for n in (4, 8):
        out = _run(ex, fmt, x, experts, weights, up_warps=n)
        _assert_close(out, base, ambiguous, TOL_PAIR, f"up_warps {n}", _flips_allowed(fmt, tokens))
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
    ref, ambiguous = _reference(ex, fmt, x, experts, weights)
    for r in range(1, 6):  # each row against its own magnitude
        _assert_close(out[r:r + 1], ref[r:r + 1], ambiguous[r:r + 1], TOL_QUANT, f"row {r}")


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

    graph, static_out = capture_graph(step)
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
    # tiles per CTA stop at 256 KB of weights (csrc/moe/launch.h, kMinCtaBytes): the full width's 16-row tiles
    # (393 / 295 KB in bf16) run one per CTA; TP8's 36 KB down tiles eight per CTA
    full = moe_cuda.plan(64, 2, 32, H_FULL, 9216)
    assert (full["up_tiles"], full["down_tiles"]) == (1, 1)
    assert moe_cuda.plan(64, 2, 32, H_FULL, 1152)["down_tiles"] == 8


def test_quantized_cpu_surface():
    """Without a GPU: the 8-bit entry checks the method first, and supports_quantized is False on the CPU."""
    x = torch.randn(2, 256).to(torch.bfloat16)
    w13 = torch.zeros(4, 768, 256, dtype=torch.int8)
    w2 = torch.zeros(4, 256, 384, dtype=torch.int8)
    assert not moe_cuda.supports_quantized(x, w13, w2, 2, "experts_int8")
    with pytest.raises(ValueError, match="method must be one of"):
        moe_cuda.moe_experts_quantized(x, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2), w13,
                                       torch.ones(4, 768), w2, torch.ones(4, 256), "int4")
