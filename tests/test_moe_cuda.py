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
