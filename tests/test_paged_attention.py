"""The paged-attention torch reference (the CPU path) and the dispatch entry, on the CPU.

Ground truth: softmax(q k^T * scale) v in float64 for every query over the keys its position sees, each
sequence's context gathered through its (shuffled) block table. Tolerance for fp32 inputs: 1e-6 of max|reference|
(fp32 rounding of 16-element dot products and of softmax sums over at most 700 keys, ~2^-24 each, is below 1e-6
here); the chunked and unchunked reference agree to the same 1e-6 (chunking drops only fully masked keys and
changes the summation blocks).
"""
import pytest
import torch
import torch.nn.functional as F

from minimax_m1.ops import paged_attention as pa
from minimax_m1.ops.paged_attention import reference
from util import rel_err

HQ, HKV, D, BS = 4, 2, 16, 16
SEQS = [(0, 300), (500, 200), (37, 1), (0, 1), (16, 15)]  # (already cached, new): prompts, a chunk, decode rows
TOL = 1e-6


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = [a + b for a, b in SEQS]
    need = [-(-c // BS) for c in ctx]
    kv = torch.randn(2, sum(need) + 3, BS, HKV, D, generator=g)
    order = torch.randperm(kv.shape[1], generator=g).tolist()
    tables = torch.zeros(len(SEQS), max(need), dtype=torch.int32)
    for i, nb in enumerate(need):
        tables[i, :nb] = torch.tensor(order[:nb])
        order = order[nb:]
    seq_lens = [b for _, b in SEQS]
    q = torch.randn(sum(seq_lens), HQ, D, generator=g)
    return q, kv, tables, seq_lens, ctx


def _exact(q, kv, tables, seq_lens, ctx, scale):
    out = torch.zeros(q.shape, dtype=torch.float64)
    start = 0
    for i, (n, c) in enumerate(zip(seq_lens, ctx)):
        pos = torch.arange(c)
        slots = tables[i, pos // BS].long() * BS + pos % BS
        k, v = (kv[j].reshape(-1, HKV, D)[slots].double().repeat_interleave(HQ // HKV, dim=1) for j in (0, 1))
        for r in range(n):
            seen = c - n + r + 1
            s = torch.einsum("hd,lhd->hl", q[start + r].double(), k[:seen]) * scale
            out[start + r] = torch.einsum("hl,lhd->hd", s.softmax(-1), v[:seen])
        start += n
    return out


@pytest.mark.parametrize("max_scores", [1, 4 * 700 * 3 + 1, reference.MAX_SCORES])
def test_reference_in_chunks_matches_exact(max_scores):
    q, kv, tables, seq_lens, ctx = _case()
    exact = _exact(q, kv, tables, seq_lens, ctx, 0.3)
    out = reference.reference_paged_attention(q, kv, tables, seq_lens, ctx, 0.3, max_scores=max_scores)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel_err(out, exact) < TOL
    whole = reference.reference_paged_attention(q, kv, tables, seq_lens, ctx, 0.3, max_scores=1 << 40)
    assert rel_err(out, whole) < TOL


def test_reference_bounds_scores_per_call(monkeypatch):
    """Memory grows with the context, not its square: no SDPA call sees more than max_scores scores (a chunk
    has at least one query row)."""
    q, kv, tables, seq_lens, ctx = _case(1)
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(qc, k, v, **kw):
        seen.append(qc.shape[1] * qc.shape[2] * k.shape[2])
        return sdpa(qc, k, v, **kw)

    monkeypatch.setattr(reference.F, "scaled_dot_product_attention", spy)
    limit = HQ * 700 * 5
    reference.reference_paged_attention(q, kv, tables, seq_lens, ctx, 0.3, max_scores=limit)
    assert max(seen) <= limit and len(seen) > len(SEQS)


def test_dispatch_on_cpu_is_the_reference():
    q, kv, tables, seq_lens, ctx = _case(2)
    cu = torch.tensor([0] + torch.tensor(seq_lens).cumsum(0).tolist(), dtype=torch.int32)
    lens = torch.tensor(ctx, dtype=torch.int32)
    ref = reference.reference_paged_attention(q, kv, tables, seq_lens, ctx, 0.25)
    common = dict(max_seqlen_q=max(seq_lens), max_seqlen_k=max(ctx), is_decode=False)
    with_host = pa.paged_attention(q, kv, tables, cu, lens, 0.25, seq_lens=seq_lens, host_context_lens=ctx, **common)
    from_device = pa.paged_attention(q, kv, tables, cu, lens, 0.25, **common)
    assert torch.equal(with_host, ref) and torch.equal(from_device, ref)


def test_write_kv_then_attend_to_new_tokens():
    """write_kv stores k/v at flat slots; a fresh prompt then attends to exactly what was written."""
    q, kv, tables, _, _ = _case(3)
    n = 20
    k, v = torch.randn(2, n, HKV, D)
    slots = tables[0, torch.arange(n) // BS].long() * BS + torch.arange(n) % BS
    pa.write_kv(kv, k, v, slots)
    out = reference.reference_paged_attention(q[:n], kv, tables[:1], [n], [n], 0.5)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    expect = F.scaled_dot_product_attention(q[:n].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                            attn_mask=mask, scale=0.5, enable_gqa=True).transpose(0, 1)
    assert rel_err(out, expect) < TOL


def test_why_not_capturable_names_the_dtype():
    assert "float32" in pa.why_not_capturable(64, 8, 128, 256, torch.float32)
