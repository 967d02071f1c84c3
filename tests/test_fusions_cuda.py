"""The fused decode kernels of ops/norm and ops/router against their torch references (issue 16 item 2).

GPU tier (`gpu` marker). Shapes: the TP8 rank (hidden 6144, lightning norm over 8 heads x 128 = 1024 features,
32 experts top-2) and the full model (lightning norm over 64 x 128 = 8192), plus the kernels' edges (8 and 16384
features, 1 and 257 rows, E = 33 and 256, top-8). Outputs are poisoned (NaN blocks freed into the caching
allocator) so that an unwritten element fails.

Tolerances, from how the kernels round (bf16: 8 significant bits, unit roundoff u = 2^-8; fp16 u = 2^-11):
- vs the torch reference on the GPU, in ulps of the output dtype: the kernels perform the reference's fp32
  operations and roundings in its order; only the sum of squares accumulates in another order (fp32, ~1e-6
  relative), which can move rsqrt by an fp32 ulp and a normed element across a rounding step: <= 1 ulp. The
  residual h = RN(RN(alpha r) + RN(beta a)) has no sum: bit for bit. The gated output RN(RN(sigmoid g) * RN(norm))
  with one factor one ulp (<= 2^-7 relative) apart rounds at most 2 ulps away.
- vs exact fp64 math on the same inputs, elementwise relative: one final rounding u, plus fp32 error (1e-5:
  sums of <= 16384 squares, ~sqrt(n) 2^-24, with margin); the gated output carries three roundings (3u).
- router: the contract in fp64: logits = bf16(x . w exactly), softmax and top-k of those in fp32. Where an exact
  logit lies within 1e-5 relative of a bf16 rounding step the fp32 sum may round to the neighbour; such tokens
  (rare) are only checked for validity. Elsewhere the ids are exact (ties: the lower id) and the weights within
  2e-6 relative (the kernel's softmax repeats torch's for E = 32; other E sum in another order, ~1 fp32 ulp).
- rotary + KV store: the reference's fp32 products and sums in its order, rounded once: bit for bit, and every
  cache row the step does not write keeps its value.
- GEMV vs exact fp64 x W^T: the final rounding u |y|, plus the fp32 summation's worst case: a lane adds K/32
  products in sequence, then 5 shuffle levels and up to 8 slices, each addition off by at most 2^-24 of the
  sum of |x_i w_i| so far: (K/32 + 16) 2^-24 sum_i |x_i w_i|.
"""
import pytest
import torch

from minimax_m1.layers.rotary import PartialRotary
from minimax_m1.ops import gemv, norm, rotary, router
from minimax_m1.ops.gemv import cuda as gemv_cuda
from minimax_m1.ops.norm import cuda as norm_cuda, reference as norm_ref
from minimax_m1.ops.rotary import cuda as rotary_cuda, reference as rotary_ref
from minimax_m1.ops.router import cuda as router_cuda, reference as router_ref

pytestmark = pytest.mark.gpu

U = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
FLOOR = {torch.bfloat16: 0.0, torch.float16: 2.0 ** -25}
FP32_SLACK = 1e-5
ROWS = [1, 2, 7, 64, 257]
FEATURES = [6144, 1024, 8192, 8, 16384, 1032]  # hidden; TP8 and full lightning norms; the edges; a 3-vector tail
ALPHA = (2 * 80) ** 0.25  # DeepNorm's alpha for 80 layers
BF16_ = torch.bfloat16


def _poison(nbytes: int = 64 << 20) -> None:
    blocks = [torch.full((nbytes // 4,), float("nan"), device="cuda")]
    blocks += [torch.full(((512 << 10) // 4,), float("nan"), device="cuda") for _ in range(16)]
    del blocks


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """16-bit floats as integers in value order (adjacent representable values differ by 1)."""
    i = x.contiguous().view(torch.int16).int()
    return torch.where(i < 0, -(i & 0x7FFF), i)


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.isfinite(a).all(), "non-finite output"
    return int((_ordered(a) - _ordered(b)).abs().max().item()) if a.numel() else 0


def assert_within(out: torch.Tensor, exact: torch.Tensor, rel: float, floor=None) -> None:
    """|out - exact| <= rel |exact| + floor everywhere (fp64); floor defaults to FLOOR[dtype], half the subnormal
    spacing of the output dtype (fp16 rounds tiny values on an absolute grid of 2^-24)."""
    assert torch.isfinite(out).all(), "non-finite output"
    o, e = out.double(), exact.double()
    excess = (o - e).abs() - rel * e.abs() - (FLOOR[out.dtype] if floor is None else floor)
    worst = int(excess.argmax())
    assert excess.max() <= 0, (f"off by {(o - e).abs().flatten()[worst].item():.3g} at {e.flatten()[worst].item():.6g}"
                               f" (allowed {rel:.3g} relative)")


def _exact_norm(x: torch.Tensor, w: torch.Tensor, eps: float, sum_sq=None, size=None) -> torch.Tensor:
    xd = x.double()
    ms = xd.pow(2).mean(-1, keepdim=True) if sum_sq is None else sum_sq.double()[:, None] / size
    return w.double() * xd * torch.rsqrt(ms + eps)


def _inputs(rows, n, dtype, gen, scale=1.0):
    return (torch.randn(rows, n, generator=gen, device="cuda") * scale).to(dtype)


# ---- rms_norm / add_rms_norm

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", FEATURES)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm(rows, n, dtype):
    gen = torch.Generator(device="cuda").manual_seed(rows * 7919 + n)
    x = _inputs(rows, n, dtype, gen, 3.0)
    w = (torch.rand(n, generator=gen, device="cuda") + 0.5).to(dtype)
    assert norm_cuda.supports(x, w)
    _poison()
    out = norm.rms_norm(x, w, 1e-5)
    assert ulps(out, norm_ref.rms_norm(x, w, 1e-5)) <= 1
    assert_within(out, _exact_norm(x, w, 1e-5), U[dtype] + FP32_SLACK)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [6144, 8, 16384, 1032])
@pytest.mark.parametrize("rows", ROWS)
def test_add_rms_norm(rows, n, dtype):
    gen = torch.Generator(device="cuda").manual_seed(rows * 104729 + n)
    r, a = _inputs(rows, n, dtype, gen), _inputs(rows, n, dtype, gen, 2.0)
    w = (torch.rand(n, generator=gen, device="cuda") + 0.5).to(dtype)
    _poison()
    h, y = norm.add_rms_norm(r, a, w, 1e-5, ALPHA, 1.0)
    h_ref, y_ref = norm_ref.add_rms_norm(r, a, w, 1e-5, ALPHA, 1.0)
    assert ulps(h, h_ref) == 0  # the same IEEE products and sum, rounded in the same places
    assert ulps(y, y_ref) <= 1
    assert_within(y, _exact_norm(h_ref, w, 1e-5), U[dtype] + FP32_SLACK)


def test_add_rms_norm_beta_and_strided_rows():
    """beta != 1 rounds its product too; rows with a padded stride (a view) are read in place."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    big = _inputs(9, 6144 + 64, torch.bfloat16, gen)
    r, a = big[:, :6144], _inputs(9, 6144, torch.bfloat16, gen)
    w = (torch.rand(6144, generator=gen, device="cuda") + 0.5).to(torch.bfloat16)
    h, y = norm.add_rms_norm(r, a, w, 1e-6, 0.7, 1.3)
    h_ref, y_ref = norm_ref.add_rms_norm(r, a, w, 1e-6, 0.7, 1.3)
    assert ulps(h, h_ref) == 0 and ulps(y, y_ref) <= 1


# ---- gated_rms_norm / sum_squares

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1024, 8192, 8, 16384])
@pytest.mark.parametrize("rows", ROWS)
def test_gated_rms_norm(rows, n, dtype):
    gen = torch.Generator(device="cuda").manual_seed(rows * 31 + n)
    x, g = _inputs(rows, n, dtype, gen, 0.5), _inputs(rows, n, dtype, gen, 4.0)
    w = (torch.rand(n, generator=gen, device="cuda") + 0.5).to(dtype)
    _poison()
    out = norm.gated_rms_norm(x, g, w, 1e-6)
    assert ulps(out, norm_ref.gated_rms_norm(x, g, w, 1e-6)) <= 2
    normed = _exact_norm(x, w, 1e-6)
    exact = torch.sigmoid(g.double()) * normed
    # sigmoid(g) itself is rounded to the dtype first (as torch does): for g below about -10 it lies in fp16's
    # subnormal range, on the absolute grid, so its rounding (half a step) is multiplied by |normed|, and the
    # product (subnormal too) is rounded on that grid again: up to two output steps there (measured on an H200:
    # 0.87 of a step at 1.7e-6, the kernel within 2 ulps of the torch reference everywhere)
    assert_within(out, exact, 3 * U[dtype] + FP32_SLACK, FLOOR[dtype] * (3 + normed.abs()))


@pytest.mark.parametrize("ranks,heads", [(8, 8), (8, 64)])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_gated_rms_norm_split_over_ranks(rows, ranks, heads):
    """The tensor-parallel path: each rank's sum_squares, their sum (the all-reduce), then the norm of each rank's
    slice with the total; together they equal the whole norm (the full model's 64 heads, and the 8 heads a TP8
    emulation's norm sees when split further)."""
    n = heads * 128
    gen = torch.Generator(device="cuda").manual_seed(rows + heads)
    x, g = _inputs(rows, n, torch.bfloat16, gen, 0.5), _inputs(rows, n, torch.bfloat16, gen, 4.0)
    w = (torch.rand(n, generator=gen, device="cuda") + 0.5).to(torch.bfloat16)
    per = n // ranks
    _poison()
    parts = [norm.sum_squares(x[:, r * per:(r + 1) * per]) for r in range(ranks)]
    for r, s in enumerate(parts):
        exact = x[:, r * per:(r + 1) * per].double().pow(2).sum(-1)
        assert s.dtype == torch.float32 and s.shape == (rows,)
        assert ((s.double() - exact).abs() / exact).max() <= FP32_SLACK
    total = torch.stack(parts).sum(0)
    out = torch.cat([norm.gated_rms_norm(x[:, r * per:(r + 1) * per].contiguous(), g[:, r * per:(r + 1) * per]
                                         .contiguous(), w[r * per:(r + 1) * per].contiguous(), 1e-6, total, n)
                     for r in range(ranks)], dim=1)
    assert ulps(out, norm_ref.gated_rms_norm(x, g, w, 1e-6)) <= 2
    exact = torch.sigmoid(g.double()) * _exact_norm(x, w, 1e-6)
    assert_within(out, exact, 3 * U[torch.bfloat16] + FP32_SLACK)
    ref_split = norm_ref.gated_rms_norm(x[:, :per], g[:, :per], w[:per], 1e-6, total, n)
    assert ulps(out[:, :per], ref_split) <= 2


# ---- inside CUDA graphs

def test_norms_in_cuda_graphs():
    gen = torch.Generator(device="cuda").manual_seed(11)
    n, rows = 6144, 8
    r, a = _inputs(rows, n, torch.bfloat16, gen), _inputs(rows, n, torch.bfloat16, gen)
    x, g = _inputs(rows, 1024, torch.bfloat16, gen), _inputs(rows, 1024, torch.bfloat16, gen)
    w, wg = (torch.rand(n, device="cuda") + 0.5).to(torch.bfloat16), (torch.rand(1024, device="cuda") + 0.5).to(
        torch.bfloat16)
    norm.add_rms_norm(r, a, w, 1e-5, ALPHA, 1.0)  # warm up outside the capture (library load, first launch)
    norm.gated_rms_norm(x, g, wg, 1e-6)
    norm.rms_norm(r, w, 1e-5)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h, y = norm.add_rms_norm(r, a, w, 1e-5, ALPHA, 1.0)
        o = norm.gated_rms_norm(x, g, wg, 1e-6)
        p = norm.rms_norm(h, w, 1e-5)
    for seed in range(3):
        gen.manual_seed(100 + seed)
        for t in (r, a, x, g):
            t.copy_(_inputs(*t.shape, torch.bfloat16, gen))
        graph.replay()
        torch.cuda.synchronize()
        h_ref, y_ref = norm_ref.add_rms_norm(r, a, w, 1e-5, ALPHA, 1.0)
        assert ulps(h, h_ref) == 0 and ulps(y, y_ref) <= 1
        assert ulps(o, norm_ref.gated_rms_norm(x, g, wg, 1e-6)) <= 2
        assert ulps(p, norm_ref.rms_norm(h_ref, w, 1e-5)) <= 1


def test_norm_dispatch_keeps_the_reference_where_kernels_do_not_serve():
    x = torch.randn(3, 20, device="cuda", dtype=torch.bfloat16)  # 20 features: not a multiple of 8
    w = torch.ones(20, device="cuda", dtype=torch.bfloat16)
    assert not norm_cuda.supports(x, w)
    assert torch.equal(norm.rms_norm(x, w, 1e-5), norm_ref.rms_norm(x, w, 1e-5))
    xf = torch.randn(3, 64, device="cuda")  # fp32
    assert not norm_cuda.supports(xf, torch.ones(64, device="cuda"))
    assert norm_cuda.supports(x[:, :16], w[:16])


def test_norm_launcher_errors():
    mod = norm_cuda._load()
    x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(64, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)
    with pytest.raises(ValueError, match="weight must be bfloat16"):
        mod.norm_rms_norm(x, w.float(), 1e-5, out, True)
    with pytest.raises(ValueError, match="out must have shape"):
        mod.norm_rms_norm(x, w, 1e-5, out[:1], True)
    with pytest.raises(ValueError, match="multiple of 8"):
        mod.norm_rms_norm(x[:, :12], w[:12], 1e-5, out[:, :12], True)
    with pytest.raises(ValueError, match="size"):
        mod.norm_gated_rms_norm(x, x, w, torch.ones(2, device="cuda"), 1e-6, 32, out, True)
    empty = x[:0]
    assert norm.rms_norm(empty, w, 1e-5).shape == (0, 64)


# ---- router

def _grid_inputs(tokens, experts, hidden, dtype, gen):
    """x in {-4..4}/4 and w in {-8..8}/64: every product is a multiple of 2^-8 and every partial sum stays under
    2^24 of them, so any fp32 summation order is exact and the rounded logits are known (logits ~ N(0, 15) at
    hidden 6144, on a coarse grid: ties are common, which the contract breaks towards the lower id)."""
    x = torch.randint(-4, 5, (tokens, hidden), generator=gen, device="cuda").to(dtype) / 4
    w = torch.randint(-8, 9, (experts, hidden), generator=gen, device="cuda").to(dtype) / 64
    return x, w


def _contract(x, w, top_k):
    """(ids [T, k], weights [T, k]) of the router's contract: the exact logits rounded to x's dtype, their fp32
    softmax, the top k in descending order with ties to the lower id, renormalised."""
    logits = (x.double() @ w.double().t()).float().to(x.dtype)  # exact in fp32 for _grid_inputs
    p = torch.softmax(logits.float(), dim=-1)
    order = torch.sort(-p, dim=-1, stable=True).indices[:, :top_k]
    chosen = p.gather(-1, order)
    return order, chosen / chosen.sum(-1, keepdim=True)


ROUTER_CASES = [(32, 6144, 2, t) for t in (1, 2, 7, 8, 9, 64)] + [
    (32, 6144, 2, 200),   # more tokens than the dispatch sends (the kernels take any count)
    (8, 6144, 1, 5), (33, 512, 3, 17), (256, 1024, 8, 9), (4, 8, 4, 3), (64, 6144, 6, 4)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("experts,hidden,top_k,tokens", ROUTER_CASES)
def test_router_contract(experts, hidden, top_k, tokens, dtype):
    gen = torch.Generator(device="cuda").manual_seed(experts * 1000 + tokens + top_k)
    x, w = _grid_inputs(tokens, experts, hidden, dtype, gen)
    if experts > 2:  # two experts with one weight row: their logits tie for every token
        w[2] = w[1]
    assert router_cuda.supports(x, w, top_k)
    _poison()
    weights, ids = router_cuda.route(x, w, top_k)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (tokens, top_k)
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    assert (weights.sum(-1) - 1).abs().max() <= 1e-6
    want_ids, want_w = _contract(x, w, top_k)
    assert torch.equal(ids, want_ids)
    assert ((weights - want_w).abs() / want_w.clamp_min(1e-30)).max() <= 2e-6


def _untied(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Tokens whose k + 1 largest logits are distinct (torch.topk's order among ties is unspecified)."""
    top = logits.topk(top_k + 1, dim=-1).values
    return (top.diff(dim=-1) != 0).all(-1)


@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_router_matches_reference_module(tokens, monkeypatch):
    """Against ops/router/reference.py (cuBLAS logits, torch softmax and topk) at the model's shape: the same
    experts and weights within 2e-6 wherever the reference's own order is defined (no ties)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x, w = _grid_inputs(tokens, 32, 6144, torch.bfloat16, gen)
    weights, ids = router.route(x, w, 2)
    ref_w, ref_ids = router_ref.route(x, w, 2)
    ok = _untied((x.double() @ w.double().t()).to(torch.bfloat16), 2)
    assert ok.float().mean() > 0.5, "too few untied tokens to check"
    assert torch.equal(ids[ok], ref_ids[ok])
    assert ((weights[ok] - ref_w[ok]).abs() / ref_w[ok]).max() <= 2e-6


def test_router_random_inputs_match_reference_module():
    """Real-valued inputs (fp32 sums rounded in another order than cuBLAS's): where the second and third logits
    are more than two bf16 steps apart, the same experts; weights within 2e-2 (a logit one bf16 step, <= 2^-7 of
    |logit|, away moves a weight by about that much times the logit; most agree exactly)."""
    gen = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn(64, 6144, generator=gen, device="cuda").to(torch.bfloat16)
    w = (torch.randn(32, 6144, generator=gen, device="cuda") * 6144 ** -0.5).to(torch.bfloat16)
    weights, ids = router.route(x, w, 2)
    ref_w, ref_ids = router_ref.route(x, w, 2)
    top = (x.double() @ w.double().t()).sort(-1, descending=True).values
    separated = (top[:, 1] - top[:, 2]) > 2 * 2.0 ** -7 * top[:, 1].abs().clamp_min(1)
    assert separated.float().mean() > 0.5
    # the order of the k chosen experts is the order of their logits, which the first two may swap where they are
    # close (the layer's sum does not depend on it): compare each token's choices sorted by expert id
    ids, order = ids.sort(-1)
    ref_ids, ref_order = ref_ids.sort(-1)
    weights, ref_w = weights.gather(-1, order), ref_w.gather(-1, ref_order)
    assert torch.equal(ids[separated], ref_ids[separated])
    assert (weights[separated] - ref_w[separated]).abs().max() <= 2e-2


def test_router_in_cuda_graph():
    gen = torch.Generator(device="cuda").manual_seed(5)
    x, w = _grid_inputs(8, 32, 6144, torch.bfloat16, gen)
    router_cuda.route(x, w, 2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = router_cuda.route(x, w, 2)
    for seed in range(3):
        x.copy_(_grid_inputs(8, 32, 6144, torch.bfloat16, gen)[0])
        graph.replay()
        torch.cuda.synchronize()
        want_ids, want_w = _contract(x, w, 2)
        assert torch.equal(ids, want_ids)
        assert ((weights - want_w).abs() / want_w).max() <= 2e-6


def test_router_without_pdl_is_the_same():
    gen = torch.Generator(device="cuda").manual_seed(6)
    x = torch.randn(7, 6144, generator=gen, device="cuda").to(torch.bfloat16)
    w = (torch.randn(32, 6144, generator=gen, device="cuda") * 6144 ** -0.5).to(torch.bfloat16)
    a, b = router_cuda.route(x, w, 2, pdl=True), router_cuda.route(x, w, 2, pdl=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_router_dispatch_and_errors():
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    assert not router_cuda.supports(x, w, 9)  # top_k > E
    assert not router_cuda.supports(x, w.float(), 2)
    big = torch.randn(router.FUSED_MAX_TOKENS + 1, 64, device="cuda", dtype=torch.bfloat16)
    a, b = router.route(big, w, 2), router_ref.route(big, w, 2)  # past the policy: the reference itself
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    mod = router_cuda._load()
    logits = torch.empty(4, 8, device="cuda")
    with pytest.raises(ValueError, match="top_k"):
        mod.router_route(x, w, logits, torch.empty(4, 9, device="cuda"), torch.empty(4, 9, device="cuda",
                                                                                    dtype=torch.int64), True)
    with pytest.raises(ValueError, match="ids must be int64"):
        mod.router_route(x, w, logits, torch.empty(4, 2, device="cuda"), torch.empty(4, 2, device="cuda",
                                                                                    dtype=torch.int32), True)
    empty_w, empty_ids = router_cuda.route(x[:0], w, 2)
    assert empty_w.shape == (0, 2) and empty_ids.shape == (0, 2)


# ---- rotary + KV store

def _rotary_case(tokens, hq, hkv, d, rd, dtype, gen, blocks=64, block_size=16, token_stride=None):
    w = token_stride or hq * d
    q = (torch.randn(tokens, w, generator=gen, device="cuda") * 2).to(dtype)[:, :hq * d].view(tokens, hq, d)
    k = (torch.randn(tokens, hkv, d, generator=gen, device="cuda") * 2).to(dtype)
    v = torch.randn(tokens, hkv, d, generator=gen, device="cuda").to(dtype)
    cache = torch.randn(2, blocks, block_size, hkv, d, generator=gen, device="cuda").to(dtype)
    slots = torch.randperm(blocks * block_size, generator=gen, device="cuda")[:tokens]
    positions = torch.randint(0, 1 << 20, (tokens,), generator=gen, device="cuda")
    rope = PartialRotary(d, rd, 10_000_000.0).cuda()
    rope.init_buffers()
    cos, sin = rope.cos_sin(positions)
    return q, k, v, cos, sin, cache, slots


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d,rd", [(8, 1, 128, 64), (64, 8, 128, 64), (4, 2, 128, 128), (8, 2, 64, 32),
                                         (16, 16, 128, 16)])
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
def test_rotary_write_kv(tokens, hq, hkv, d, rd, dtype):
    gen = torch.Generator(device="cuda").manual_seed(tokens * 131 + hq + d + rd)
    q, k, v, cos, sin, cache, slots = _rotary_case(tokens, hq, hkv, d, rd, dtype, gen)
    assert rotary_cuda.supports(q, k, v, cos, cache)
    ref_cache = cache.clone()
    want_q = rotary_ref.rotary_write_kv(q, k, v, cos, sin, ref_cache, slots)
    _poison()
    got_q = rotary.rotary_write_kv(q, k, v, cos, sin, cache, slots)
    assert ulps(got_q, want_q) == 0
    assert torch.equal(cache, ref_cache)


def test_rotary_write_kv_strided_q_and_int32_slots():
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v, cos, sin, cache, slots = _rotary_case(9, 8, 1, 128, 64, torch.bfloat16, gen, token_stride=8 * 128 + 256)
    assert not q.is_contiguous() and rotary_cuda.supports(q, k, v, cos, cache)
    ref_cache = cache.clone()
    want_q = rotary_ref.rotary_write_kv(q, k, v, cos, sin, ref_cache, slots)
    got_q = rotary.rotary_write_kv(q, k, v, cos, sin, cache, slots.int())
    assert ulps(got_q, want_q) == 0 and torch.equal(cache, ref_cache)


def test_rotary_write_kv_skips_slots_outside_the_cache():
    gen = torch.Generator(device="cuda").manual_seed(2)
    q, k, v, cos, sin, cache, slots = _rotary_case(4, 8, 1, 128, 64, torch.bfloat16, gen)
    slots[1], slots[3] = -1, cache.shape[1] * cache.shape[2]
    before = cache.clone()
    got_q = rotary.rotary_write_kv(q, k, v, cos, sin, cache, slots)
    assert ulps(got_q, rotary_ref.apply_rotary(q, cos, sin)) == 0
    ref_cache = before.clone()
    keep = torch.tensor([0, 2], device="cuda")
    rotary_ref.rotary_write_kv(q[keep], k[keep], v[keep], cos[keep], sin[keep], ref_cache, slots[keep])
    assert torch.equal(cache, ref_cache)


def test_rotary_write_kv_in_cuda_graph():
    gen = torch.Generator(device="cuda").manual_seed(4)
    q, k, v, cos, sin, cache, slots = _rotary_case(8, 8, 1, 128, 64, torch.bfloat16, gen)
    rotary.rotary_write_kv(q, k, v, cos, sin, cache, slots)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rotary.rotary_write_kv(q, k, v, cos, sin, cache, slots)
    for seed in range(3):
        nq, nk, nv, ncos, nsin, _, nslots = _rotary_case(8, 8, 1, 128, 64, torch.bfloat16, gen)
        for dst, src in ((q, nq), (k, nk), (v, nv), (cos, ncos), (sin, nsin), (slots, nslots)):
            dst.copy_(src)
        ref_cache = cache.clone()
        want = rotary_ref.rotary_write_kv(q, k, v, cos, sin, ref_cache, slots)
        graph.replay()
        torch.cuda.synchronize()
        assert ulps(out, want) == 0 and torch.equal(cache, ref_cache)


def test_rotary_dispatch_and_errors():
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, cos, sin, cache, slots = _rotary_case(3, 4, 2, 128, 64, torch.bfloat16, gen)
    assert not rotary_cuda.supports(q.float(), k.float(), v.float(), cos, cache)  # fp32: the reference
    assert not rotary_cuda.supports(q, k, v, cos[:, :24], cache)  # rotary_dim / 2 not a multiple of 8
    mod = rotary_cuda._load()
    with pytest.raises(ValueError, match="kv_cache must be"):
        mod.rotary_write_kv(q, k, v, cos, sin, cache[:, :, :, :1], slots, torch.empty_like(q), True)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        mod.rotary_write_kv(q, k, v, cos, sin, cache, slots.float(), torch.empty_like(q), True)


# ---- lightning decode with the SiLU applied as it loads

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch,heads", [(1, 8), (8, 8), (64, 8), (3, 64)])
def test_lightning_decode_applies_silu(batch, heads, dtype):
    """decode(raw q, k, v, silu=True) == decode(F.silu(q), F.silu(k), F.silu(v)) bit for bit (the kernel repeats
    F.silu's x / (1 + exp(-x)) in fp32 and its rounding), outputs and states; read in place from the per-head
    [q | k | v] projection output, as the layer passes it; slot -1 is padding."""
    import torch.nn.functional as F

    from minimax_m1.config import lightning_slopes
    from minimax_m1.ops.lightning_attn import cuda as la_cuda

    gen = torch.Generator(device="cuda").manual_seed(batch * heads)
    qkv = (torch.randn(batch, heads, 3 * 128, generator=gen, device="cuda") * 2).to(dtype)
    q, k, v = qkv.split(128, dim=-1)
    slopes = torch.tensor(lightning_slopes(64, 3, 80)[:heads], device="cuda")
    start = torch.randn(batch + 2, heads, 128, 128, generator=gen, device="cuda")
    slots = torch.randperm(batch + 2, generator=gen, device="cuda")[:batch].int()
    if batch > 1:
        slots[1] = -1
    pool_a, pool_b = start.clone(), start.clone()
    fused = la_cuda.decode(q, k, v, slopes, pool_a, slots, silu=True)
    plain = la_cuda.decode(F.silu(q), F.silu(k), F.silu(v), slopes, pool_b, slots)
    assert torch.equal(fused, plain) and torch.equal(pool_a, pool_b)


# ---- GEMV

GEMV_SHAPES = [(3072, 6144), (1024, 6144), (6144, 1024), (128, 6144), (32, 6144), (25008, 6144),  # TP8 rank
               (24576, 6144), (8192, 6144), (6144, 8192), (1024, 6144),  # full model
               (1, 8), (7, 264), (33, 2056)]  # edges: one row, short and odd sizes


def _check_gemv(y, x, w):
    exact = x.double() @ w.double().t()
    bound = (x.double().abs() @ w.double().abs().t()) * (x.shape[1] / 32 + 16) * 2.0 ** -24
    assert y.dtype == x.dtype and y.shape == exact.shape and torch.isfinite(y).all()
    excess = (y.double() - exact).abs() - U[y.dtype] * exact.abs() - bound
    assert excess.max() <= 0, f"off by {excess.max().item():.3g} beyond the bound"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", GEMV_SHAPES)
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 8])
def test_gemv(tokens, n, k, dtype):
    gen = torch.Generator(device="cuda").manual_seed(tokens * 7 + n + k)
    x = torch.randn(tokens, k, generator=gen, device="cuda").to(dtype)
    w = (torch.randn(n, k, generator=gen, device="cuda") * k ** -0.5).to(dtype)
    assert gemv_cuda.supports(x, w)
    _poison()
    _check_gemv(gemv_cuda.gemv(x, w), x, w)


@pytest.mark.parametrize("k", [6144, 1024])
@pytest.mark.parametrize("ksplit", [1, 2, 4, 8])
@pytest.mark.parametrize("tokens", [1, 2, 4, 8])
def test_gemv_every_split(ksplit, tokens, k):
    gen = torch.Generator(device="cuda").manual_seed(ksplit + tokens)
    x = torch.randn(tokens, k, generator=gen, device="cuda").to(torch.bfloat16)
    w = (torch.randn(1000, k, generator=gen, device="cuda") * k ** -0.5).to(torch.bfloat16)
    _poison()
    _check_gemv(gemv_cuda.gemv(x, w, ksplit), x, w)


def test_gemv_strided_x_and_dispatch():
    gen = torch.Generator(device="cuda").manual_seed(8)
    big = torch.randn(gemv.MAX_TOKENS, 6144 + 8, generator=gen, device="cuda").to(torch.bfloat16)
    x = big[:, 8:]  # rows at a stride, 16 bytes in
    w = (torch.randn(512, 6144, generator=gen, device="cuda") * 6144 ** -0.5).to(torch.bfloat16)
    _check_gemv(gemv.linear(x, w), x, w)
    many = torch.randn(gemv.MAX_TOKENS + 1, 6144, device="cuda").to(torch.bfloat16)
    assert torch.equal(gemv.linear(many, w), torch.nn.functional.linear(many, w))  # past the policy: cuBLAS
    assert not gemv_cuda.supports(x.float(), w.float())
    mod = gemv_cuda._load()
    with pytest.raises(ValueError, match="at most 8 rows"):
        mod.gemv(torch.zeros(9, 64, device="cuda", dtype=torch.bfloat16), w[:, :64].contiguous(),
                 torch.empty(9, 512, device="cuda", dtype=torch.bfloat16), 0, True)
    with pytest.raises(ValueError, match="ksplit"):
        mod.gemv(x.contiguous(), w, torch.empty(x.shape[0], 512, device="cuda", dtype=torch.bfloat16), 3, True)


# parts: the rank shapes' stacked projections (TP8 lightning qkv + output gate, TP8 softmax q, k, v), odd sizes
GEMV_PARTS = [[(3072, 6144), (1024, 6144)], [(1024, 6144), (128, 6144), (128, 6144)], [(7, 264), (1, 264), (33, 264)]]


@pytest.mark.parametrize("shapes", GEMV_PARTS)
@pytest.mark.parametrize("tokens", [1, 2, 5, 8])
def test_gemv_parts(tokens, shapes):
    """Several weights in one launch: each output within the GEMV bound, and bit-identical to its own gemv at
    the same split of K (a row's sum depends on the split only, not on where the row sits in the stack)."""
    gen = torch.Generator(device="cuda").manual_seed(tokens + len(shapes))
    k = shapes[0][1]
    x = torch.randn(tokens, k, generator=gen, device="cuda").to(torch.bfloat16)
    ws = [(torch.randn(n, k, generator=gen, device="cuda") * k ** -0.5).to(torch.bfloat16) for n, _ in shapes]
    _poison()
    ys = gemv_cuda.gemv_parts(x, ws)
    for y, w in zip(ys, ws):
        _check_gemv(y, x, w)
    for ksplit in (1, 2, 8):
        for y, w in zip(gemv_cuda.gemv_parts(x, ws, ksplit), ws):
            assert torch.equal(y, gemv_cuda.gemv(x, w, ksplit))
    # the layers' entry: the same values where it takes the one launch, cuBLAS's past the policy
    if tokens <= gemv.MAX_TOKENS and k >= gemv.MIN_K:
        assert all(torch.equal(a, b) for a, b in zip(gemv.linear_parts(x, ws), ys))
    else:
        assert all(torch.equal(a, torch.nn.functional.linear(x, w)) for a, w in zip(gemv.linear_parts(x, ws), ws))


def test_gemv_parts_errors():
    mod = gemv_cuda._load()
    x = torch.zeros(1, 64, device="cuda", dtype=torch.bfloat16)
    w, y = torch.zeros(16, 64, device="cuda", dtype=torch.bfloat16), torch.empty(1, 16, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="parts must be 1..3"):
        mod.gemv_parts(x, w, y, w, y, w, y, 4, 0, True)
    with pytest.raises(ValueError, match="w"):  # a part of another K
        mod.gemv_parts(x, w, y, torch.zeros(16, 72, device="cuda", dtype=torch.bfloat16), y, w, y, 2, 0, True)
    with pytest.raises(ValueError, match="y"):  # a part's output of the wrong width
        mod.gemv_parts(x, w, y, w, torch.empty(1, 8, device="cuda", dtype=torch.bfloat16), w, y, 2, 0, True)


def test_gemv_in_cuda_graph():
    gen = torch.Generator(device="cuda").manual_seed(10)
    x = torch.randn(2, 6144, generator=gen, device="cuda").to(torch.bfloat16)
    w = (torch.randn(3072, 6144, generator=gen, device="cuda") * 6144 ** -0.5).to(torch.bfloat16)
    gemv_cuda.gemv(x, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemv_cuda.gemv(x, w)
    for _ in range(3):
        x.copy_(torch.randn(2, 6144, generator=gen, device="cuda").to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        _check_gemv(y, x, w)


# ---- programmatic dependent launch changes nothing

def test_pdl_chain_matches_serial_launches(monkeypatch):
    """A decode layer's chain of fused kernels (norm -> GEMV -> lightning decode -> gated norm -> GEMV ->
    residual norm -> router -> fused MoE, fp8 then bf16 -> rotary) launched as programmatic dependents, eagerly
    and inside a CUDA graph, equals the same chain launched one after the other: each kernel reads what the
    kernel before wrote only after its wait, with coherent loads (an .nc load of the GEMV's x was hoisted above
    the wait once the norm before it let it launch early: token 0's outputs differed in graphs), and a kernel
    that starts while the one before drains reads nothing else that is still being written."""
    from minimax_m1.config import lightning_slopes
    from minimax_m1.ops import _library
    from minimax_m1.ops.lightning_attn import cuda as la_cuda
    from minimax_m1.ops.moe import cuda as moe_cuda
    from minimax_m1.ops.moe.quantized import quantize_weight

    gen = torch.Generator(device="cuda").manual_seed(12)
    h = torch.randn(4, 6144, generator=gen, device="cuda").to(BF16_)
    w_norm = (torch.rand(6144, generator=gen, device="cuda") + 0.5).to(BF16_)
    w_gate = (torch.randn(1024, 6144, generator=gen, device="cuda") * 6144 ** -0.5).to(BF16_)
    w_out = (torch.randn(6144, 1024, generator=gen, device="cuda") * 1024 ** -0.5).to(BF16_)
    w_small = (torch.rand(1024, generator=gen, device="cuda") + 0.5).to(BF16_)
    router_w = (torch.randn(32, 6144, generator=gen, device="cuda") * 6144 ** -0.5).to(BF16_)
    w_qkv = (torch.randn(3 * 1024, 6144, generator=gen, device="cuda") * 6144 ** -0.5).to(BF16_)
    slopes = torch.tensor(lightning_slopes(64, 3, 80)[:8], device="cuda")
    pool = torch.randn(6, 8, 128, 128, generator=gen, device="cuda")
    state_slots = torch.tensor([4, 0, -1, 2], dtype=torch.int32, device="cuda")
    w13 = (torch.randn(32, 2 * 128, 6144, generator=gen, device="cuda") * 6144 ** -0.5).to(BF16_)
    w2 = (torch.randn(32, 6144, 128, generator=gen, device="cuda") * 128 ** -0.5).to(BF16_)
    fp8_13, fp8_2 = quantize_weight(w13, "fp8"), quantize_weight(w2, "fp8")
    q, k, v, cos, sin, cache, slots = _rotary_case(4, 8, 1, 128, 64, BF16_, gen)

    def chain(c, states):
        xn = norm.rms_norm(h, w_norm, 1e-5)
        qkv, g = gemv_cuda.gemv_parts(xn, [w_qkv, w_gate])
        lq, lk, lv = qkv.view(4, 8, 3 * 128).split(128, dim=-1)
        d = la_cuda.decode(lq, lk, lv, slopes, states, state_slots, silu=True).view(4, 1024)
        o = norm.gated_rms_norm(d, g, w_small, 1e-6)
        a = gemv_cuda.gemv(o, w_out)
        hh, yn = norm.add_rms_norm(xn, a, w_norm, 1e-5, ALPHA, 1.0)
        weights, ids = router_cuda.route(yn, router_w, 2)
        m8 = moe_cuda.moe_experts_quantized(yn, ids, weights, *fp8_13, *fp8_2, "fp8")
        weights, ids = router_cuda.route(m8, router_w, 2)
        m = moe_cuda.moe_experts(m8, ids, weights, w13, w2)
        qr = rotary.rotary_write_kv(q, k, v, cos, sin, c, slots)
        return [xn, qkv, g, d, o, a, hh, yn, m8, weights, ids, m, qr, c, states]

    results = {}
    for pdl in (False, True):
        monkeypatch.setattr(_library, "FUSED_PDL", pdl)
        monkeypatch.setattr(_library, "MOE_PDL", pdl)
        eager = chain(cache.clone(), pool.clone())
        c, states = cache.clone(), pool.clone()
        chain(c.clone(), states.clone())  # warm up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = chain(c, states)
        graph.replay()
        torch.cuda.synchronize()
        results[pdl] = (eager, captured)
    for a, b in zip(results[False][0] + results[False][1], results[True][0] + results[True][1]):
        assert torch.equal(a, b)


# ---- the model with and without the fused kernels

def test_model_output_unchanged_by_the_fusions(monkeypatch):
    """A small bf16 model with M1's head size (4 layers, hidden 256, 4 x 128 lightning features, 4 experts top-2):
    prompt logits with the fused norms, router, rotary and GEMV against the same model on the torch references. The kernels
    move a normed element by at most one bf16 step, so the logits differ by rounding noise only (rel 2e-2 of
    max|logit|, about five bf16 steps after four layers), and greedy decoding (CUDA graphs) agrees token for
    token unless two candidates are within rounding of a tie."""
    import dataclasses
    import gc

    from minimax_m1 import LLM, SamplingParams
    from minimax_m1.config import LINEAR, SOFTMAX, tiny_config
    from minimax_m1.engine import builder

    cfg = dataclasses.replace(tiny_config(262), hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=128, rotary_dim=64, intermediate_size=256,
                              attn_type_list=[LINEAR, LINEAR, LINEAR, SOFTMAX])
    monkeypatch.setattr(builder, "tiny_config", lambda vocab: dataclasses.replace(cfg, vocab_size=vocab))
    ids = [(i * 37) % 256 for i in range(300)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=1)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(norm_cuda, "supports", lambda *a: False)
            monkeypatch.setattr(norm_cuda, "supports_rows", lambda *a: False)
            monkeypatch.setattr(router_cuda, "supports", lambda *a: False)
            monkeypatch.setattr(rotary_cuda, "supports", lambda *a: False)
            monkeypatch.setattr(gemv_cuda, "supports", lambda *a: False)
        llm = LLM("tiny", device="cuda", dtype="bfloat16", gpu_memory_utilization=0.2, max_num_seqs=8)
        logits = llm.prompt_logits(ids).float()
        out = llm.generate(prompt_token_ids=ids[:40], sampling_params=params)[0].outputs[0]
        results.append((logits, out))
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    (a, fa), (b, fb) = results
    assert torch.isfinite(a).all()
    assert ((a - b).abs().max() / b.abs().max()).item() < 2e-2
    for i, (x, y) in enumerate(zip(fa.token_ids, fb.token_ids)):
        if x != y:
            assert abs(fa.logprobs[i][x] - fb.logprobs[i][y]) < 0.05, (i, fa.token_ids, fb.token_ids)
            break
