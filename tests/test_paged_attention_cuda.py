"""The CUDA paged decode-attention kernel against softmax attention in float64.

GPU tier (`gpu` marker). Ground truth: for each sequence, its context gathered through the block table from the
same (rounded) cache, softmax(q k^T * scale) v in float64 on the GPU. Every cache slot that no context covers
holds NaN, so a kernel that reads past a context or through a wrong table entry fails loudly; block tables are
shuffled. Tolerance: max|error| / max|reference| <= 1e-2 for bf16 and 4e-3 for fp16 (the output's own rounding
costs up to 2^-9 = 2e-3 and 2^-12 of it; the softmax weights go through the mma in the input type).

The CPU tier (unmarked) checks that the module imports without the library and reports itself unavailable.
On a machine with a GPU, unbuilt kernels fail the GPU tier (tests/conftest.py), never skip it.
"""
import os
import subprocess
import sys

import pytest
import torch

from minimax_m1.ops.paged_attention import cuda as pac
from util import rel_err

TOL = {torch.bfloat16: 1e-2, torch.float16: 4e-3}
CONTEXTS = [1, 15, 255, 256, 257, 4097, 100000]
SCRATCH = 0  # block 0: the padding rows' scratch block (only its token 0 is written)


def test_import_without_library():
    code = (
        "from minimax_m1.ops.paged_attention import cuda as pac\n"
        "assert not pac.available()\n"
        "assert 'nonexistent' in pac.load_error()\n"
    )
    env = dict(os.environ, MINIMAX_M1_PAGED_ATTN_LIB="/nonexistent/libpaged_attn.so")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def _fill(kv, contexts, gen, max_blocks=None):
    """Write random K/V for `contexts` into kv (everything else NaN) at shuffled blocks; returns the tables."""
    _, num_blocks, block_size, hkv, d = kv.shape
    need = [-(-c // block_size) for c in contexts]
    max_blocks = max_blocks or max(need + [1])
    assert sum(need) < num_blocks and max(need + [0]) <= max_blocks
    kv.fill_(float("nan"))
    flat = kv.view(2, -1, hkv, d)
    flat[:, SCRATCH * block_size] = torch.randn(2, hkv, d, generator=gen, device=kv.device).to(kv.dtype)
    order = torch.randperm(num_blocks - 1, generator=gen, device=kv.device) + 1
    tables = torch.full((len(contexts), max_blocks), SCRATCH, dtype=torch.int32, device=kv.device)
    start = 0
    for i, (ctx, nb) in enumerate(zip(contexts, need)):
        tables[i, :nb] = order[start:start + nb].int()
        start += nb
        pos = torch.arange(ctx, device=kv.device)
        slots = tables[i, pos // block_size].long() * block_size + pos % block_size
        flat[:, slots] = torch.randn(2, ctx, hkv, d, generator=gen, device=kv.device).to(kv.dtype)
    return tables


def _reference(q, kv, tables, contexts, scale):
    n, hq, d = q.shape
    block_size, hkv = kv.shape[2], kv.shape[3]
    flat = kv.view(2, -1, hkv, d)
    out = torch.zeros(n, hq, d, dtype=torch.float64, device=q.device)
    for i, ctx in enumerate(contexts):
        if ctx == 0:
            continue
        pos = torch.arange(ctx, device=q.device)
        slots = tables[i, pos // block_size].long() * block_size + pos % block_size
        k, v = flat[0, slots].double(), flat[1, slots].double()  # [ctx, hkv, d]
        s = torch.einsum("hgd,lhd->hgl", q[i].double().view(hkv, hq // hkv, d), k) * scale
        out[i] = torch.einsum("hgl,lhd->hgd", s.softmax(-1), v).reshape(hq, d)
    return out


def _case(contexts, hq, hkv, d, block_size, dtype, seed, spare_blocks=4):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    num_blocks = sum(-(-c // block_size) for c in contexts) + spare_blocks + 1
    kv = torch.empty(2, num_blocks, block_size, hkv, d, dtype=dtype, device="cuda")
    tables = _fill(kv, contexts, gen)
    q = (2 * torch.randn(len(contexts), hq, d, generator=gen, device="cuda")).to(dtype)
    lens = torch.tensor(contexts, dtype=torch.int32, device="cuda")
    return q, kv, tables, lens


def _check(contexts, hq, hkv, d, block_size, dtype, max_context, seed=0):
    q, kv, tables, lens = _case(contexts, hq, hkv, d, block_size, dtype, seed)
    scale = d ** -0.5
    out = pac.paged_decode(q, kv, tables, lens, scale, max_context)
    err = rel_err(out, _reference(q, kv, tables, contexts, scale))
    assert err <= TOL[dtype], (err, pac.num_splits(len(contexts), hkv, d, max_context))
    return err


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,hq,hkv,d,block_size", [
    (torch.bfloat16, 64, 8, 128, 256),  # MiniMax-M1
    (torch.float16, 64, 8, 128, 256),
    (torch.bfloat16, 8, 8, 128, 256),  # no GQA
    (torch.bfloat16, 32, 2, 64, 16),  # 16 query heads per kv head, smallest blocks
    (torch.float16, 12, 4, 64, 48),  # 3 per kv head, a block size that is no power of two
])
def test_mixed_contexts(dtype, hq, hkv, d, block_size):
    assert pac.num_splits(len(CONTEXTS), hkv, d, 131072) > 1  # the combine step runs
    _check(CONTEXTS, hq, hkv, d, block_size, dtype, max_context=131072)


@pytest.mark.gpu
@pytest.mark.parametrize("ctx", CONTEXTS)
@pytest.mark.parametrize("max_context", [None, 1 << 20])
def test_batch_one(ctx, max_context):
    _check([ctx], 64, 8, 128, 256, torch.bfloat16, max_context or ctx, seed=ctx)


@pytest.mark.gpu
@pytest.mark.parametrize("hkv", [8, 1])
def test_batch_64(hkv):
    gen = torch.Generator().manual_seed(64)
    contexts = torch.randint(1, 3000, (64,), generator=gen).tolist()
    contexts[:4] = [1, 256, 257, 4097]
    _check(contexts, 8 * hkv, hkv, 128, 256, torch.bfloat16, max_context=8192, seed=1)


@pytest.mark.gpu
def test_every_output_written_and_workspace_garbage_ignored():
    q, kv, tables, lens = _case(CONTEXTS, 64, 8, 128, 256, torch.bfloat16, seed=3)
    max_context = 1 << 20
    out = torch.full_like(q, float("nan"))
    nbytes = pac.workspace_bytes(len(CONTEXTS), 64, 128, max_context, q.device.index)
    assert nbytes > 0
    workspace = torch.full((nbytes // 4,), float("nan"), device="cuda")
    workspace[:8192] = 0  # the split counters (kCounterBytes) start at zero; the rest may hold anything
    ref = _reference(q, kv, tables, CONTEXTS, 128 ** -0.5)
    for _ in range(2):  # the second launch relies on the first leaving its counters at zero
        pac._load().paged_decode(q, kv, tables, lens, out, workspace, 128 ** -0.5, max_context)
        assert rel_err(out, ref) <= TOL[torch.bfloat16]
        out.fill_(float("nan"))
    assert (workspace[:8192] == 0).all()


@pytest.mark.gpu
def test_empty_context_gives_zeros_and_empty_batch():
    q, kv, tables, lens = _case([0, 5], 16, 8, 128, 16, torch.bfloat16, seed=4)
    out = pac.paged_decode(q, kv, tables, lens, 0.1, 64)
    assert (out[0] == 0).all()
    assert pac.paged_decode(q[:0], kv, tables[:0], lens[:0], 0.1, 64).shape == (0, 16, 128)


@pytest.mark.gpu
def test_strided_inputs():
    contexts = [300, 1, 1000]
    q, kv, tables, lens = _case(contexts, 64, 8, 128, 256, torch.bfloat16, seed=5)
    ref = _reference(q, kv, tables, contexts, 0.08)
    # q as a slice of a fused qkv projection, tables as a slice of a wider table
    qkv = torch.randn(3, 64 + 16, 128, device="cuda").to(torch.bfloat16)
    qkv[:, :64] = q
    wide = torch.full((3, tables.shape[1] + 5), SCRATCH, dtype=torch.int32, device="cuda")
    wide[:, :tables.shape[1]] = tables
    assert rel_err(pac.paged_decode(qkv[:, :64], kv, wide, lens, 0.08, 4096), ref) <= 1e-2
    # a q whose rows are not 16-byte aligned is copied first
    odd = torch.empty(3 * 64 * 128 + 1, device="cuda", dtype=torch.bfloat16)[1:].view(3, 64, 128)
    odd.copy_(q)
    assert rel_err(pac.paged_decode(odd, kv, tables, lens, 0.08, 4096), ref) <= 1e-2


@pytest.mark.gpu
def test_bad_arguments_raise():
    q, kv, tables, lens = _case([20], 64, 8, 128, 16, torch.bfloat16, seed=6)
    with pytest.raises(ValueError, match="block_size"):
        pac.paged_decode(q, kv.view(2, -1, 8, 8, 128), tables, lens, 0.1, 64)
    with pytest.raises(ValueError, match="num_kv_heads"):
        pac.paged_decode(q, kv[:, :, :, :2], tables, lens, 0.1, 64)
    with pytest.raises(ValueError, match="dtype|float16"):
        pac.paged_decode(q, kv.half(), tables, lens, 0.1, 64)
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match="workspace"):
        pac._load().paged_decode(q, kv, tables, lens, out, torch.empty(16, dtype=torch.uint8, device="cuda"), 0.1,
                                 1 << 20)


@pytest.mark.gpu
def test_opcheck():
    q, kv, tables, lens = _case([7, 300], 16, 2, 64, 16, torch.bfloat16, seed=7)
    kv.normal_()  # no NaN: opcheck compares inputs before and after
    torch.library.opcheck(torch.ops.minimax_m1.paged_decode.default, (q, kv, tables, lens, 0.125, 512))


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_tables_and_lengths():
    hq, hkv, d, block_size, batch, max_context = 64, 8, 128, 256, 8, 1 << 20
    max_blocks = 40
    gen = torch.Generator(device="cuda").manual_seed(8)
    kv = torch.empty(2, 8 * max_blocks + 1, block_size, hkv, d, dtype=torch.bfloat16, device="cuda")
    q = torch.empty(batch, hq, d, dtype=torch.bfloat16, device="cuda")
    tables = torch.full((batch, max_blocks), SCRATCH, dtype=torch.int32, device="cuda")
    lens = torch.ones(batch, dtype=torch.int32, device="cuda")
    assert pac.num_splits(batch, hkv, d, max_context) > 1
    pac.reserve(batch, hq, d, max_context)

    def step():
        return pac.paged_decode(q, kv, tables, lens, d ** -0.5, max_context)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    rounds = [[1, 1, 1, 1, 1, 1, 1, 1],
              [4097, 1, 255, 10000, 256, 1, 1, 1],  # the last rows: padding on the scratch block
              [257, 9000, 15, 1, 2, 3000, 511, 7000]]
    for contexts in rounds:
        new_tables = _fill(kv, contexts, gen, max_blocks=max_blocks)
        for i, ctx in enumerate(contexts):
            if ctx == 1 and i >= 5:
                new_tables[i] = SCRATCH
        tables.copy_(new_tables)
        lens.copy_(torch.tensor(contexts, dtype=torch.int32))
        q.copy_(2 * torch.randn(batch, hq, d, generator=gen, device="cuda"))
        out.fill_(float("nan"))
        graph.replay()
        assert rel_err(out, _reference(q, kv, tables, contexts, d ** -0.5)) <= TOL[torch.bfloat16], contexts
