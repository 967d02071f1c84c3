"""The lightning-attention reference ops against the exact token recurrence.

Tolerances (relative to max |reference|): fp64 inputs, fp64 pool: 1e-12 (the blocked and recurrent
forms differ only in summation order). fp32: 2e-5 (fp32 accumulation over up to 1000 tokens with
|q k| ~ 1e1). bf16 inputs: the reference consumes the same bf16-rounded inputs in fp64, so the only
extra error is rounding the output to bf16: 2^-8 relative per element, 8e-3 of max.
"""
import pytest
import torch

from minimax_m1.config import lightning_slopes
from minimax_m1.ops import lightning_attn as la
from util import rel_err

H, D = 4, 32
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 8e-3}


def _inputs(lengths, dtype, slots, pool_size=8, seed=0, state_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    # the model feeds silu(linear) outputs: mostly positive, O(1)
    q, k, v = (torch.nn.functional.silu(torch.randn(t, H, D, generator=g, dtype=torch.float64)).to(dtype)
               for _ in range(3))
    slopes = torch.tensor(lightning_slopes(H, 1, 80), dtype=torch.float32)
    pool = torch.randn(pool_size, H, D, D, generator=g, dtype=torch.float64).to(state_dtype)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, slopes, pool, torch.tensor(slots, dtype=torch.int32), cu


def _exact(q, k, v, slopes, pool, slots, cu):
    """The token recurrence in fp64 on the same (rounded) inputs."""
    p = pool.to(torch.float64, copy=True)
    o = la.recurrent_prefill(q.double(), k.double(), v.double(), slopes.double(), p, slots, cu)
    return o, p


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_blocked_matches_recurrence_varlen(dtype):
    lengths = [1, 255, 256, 257, 1000]
    slots = [3, 0, 6, 1, 5]
    q, k, v, s, pool, sl, cu = _inputs(lengths, dtype, slots,
                                       state_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ref_o, ref_pool = _exact(q, k, v, s, pool, sl, cu)
    before = pool.clone()
    o = la.reference_prefill(q, k, v, s, pool, sl, cu)
    assert o.dtype == dtype and o.shape == q.shape
    assert rel_err(o, ref_o) < TOL[dtype]
    state_tol = 1e-12 if dtype == torch.float64 else 2e-5  # the state is fp32 whatever the input dtype
    assert rel_err(pool[sl.long()], ref_pool[sl.long()]) < state_tol
    untouched = [i for i in range(pool.shape[0]) if i not in slots]
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("n1,n2", [(1, 1), (100, 300), (256, 256), (257, 511)])
def test_prefill_chunks_compose(n1, n2):
    q, k, v, s, pool, sl, _ = _inputs([n1 + n2], torch.float32, [2])
    p_once, p_twice = pool.clone(), pool.clone()
    o_once = la.reference_prefill(q, k, v, s, p_once, sl, torch.tensor([0, n1 + n2], dtype=torch.int32))
    o1 = la.reference_prefill(q[:n1], k[:n1], v[:n1], s, p_twice, sl, torch.tensor([0, n1], dtype=torch.int32))
    o2 = la.reference_prefill(q[n1:], k[n1:], v[n1:], s, p_twice, sl, torch.tensor([0, n2], dtype=torch.int32))
    assert rel_err(torch.cat([o1, o2]), o_once) < TOL[torch.float32]
    assert rel_err(p_twice[2], p_once[2]) < TOL[torch.float32]


def test_decode_steps_after_prefill_equal_longer_prefill():
    n, steps = 300, 5
    # two sequences decoded together with a padding row between them
    q, k, v, s, pool, _, _ = _inputs([n + steps, n + steps], torch.float32, [0, 0])
    p_long, p_step = pool.clone(), pool.clone()
    cu_long = torch.tensor([0, n + steps, 2 * (n + steps)], dtype=torch.int32)
    slots = torch.tensor([4, 1], dtype=torch.int32)
    o_long = la.reference_prefill(q, k, v, s, p_long, slots, cu_long)
    idx = torch.cat([torch.arange(n), torch.arange(n + steps, 2 * n + steps)])
    la.reference_prefill(q[idx], k[idx], v[idx], s, p_step, slots, torch.tensor([0, n, 2 * n], dtype=torch.int32))
    before = p_step.clone()
    for t in range(steps):
        rows = torch.tensor([n + t, 0, 2 * n + steps + t])  # row 1 is padding
        dec_slots = torch.tensor([4, -1, 1], dtype=torch.int32)
        o = la.reference_decode(q[rows], k[rows], v[rows], s, p_step, dec_slots)
        assert torch.equal(o[1], torch.zeros_like(o[1]))
        assert rel_err(o[0], o_long[n + t]) < TOL[torch.float32]
        assert rel_err(o[2], o_long[2 * n + steps + t]) < TOL[torch.float32]
    assert rel_err(p_step, p_long) < TOL[torch.float32]
    untouched = [i for i in range(pool.shape[0]) if i not in (1, 4)]
    assert torch.equal(p_step[untouched], before[untouched])


def test_decode_matches_recurrence():
    q, k, v, s, pool, _, _ = _inputs([6], torch.bfloat16, [0])
    slots = torch.tensor([5, -1, 0, 2, -1, 7], dtype=torch.int32)
    ref_pool = pool.to(torch.float64, copy=True)
    ref = la.recurrent_decode(q.double(), k.double(), v.double(), s.double(), ref_pool, slots)
    o = la.decode(q, k, v, s, pool, slots)
    assert rel_err(o, ref) < TOL[torch.bfloat16]
    assert rel_err(pool, ref_pool) < 2e-5
    assert torch.equal(o[[1, 4]], torch.zeros_like(o[[1, 4]]))


def test_noncontiguous_inputs():
    """The model splits q, k, v out of one [T, H, 3D] tensor: views with a row stride of 3D."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(300, H, 3 * D, generator=g)
    q, k, v = qkv.split(D, dim=-1)
    _, _, _, s, pool, sl, cu = _inputs([300], torch.float32, [0])
    p1, p2 = pool.clone(), pool.clone()
    a = la.prefill(q, k, v, s, p1, sl, cu)
    b = la.prefill(q.contiguous(), k.contiguous(), v.contiguous(), s, p2, sl, cu)
    assert torch.equal(a, b) and torch.equal(p1, p2)


def test_bad_arguments_raise():
    q, k, v, s, pool, sl, cu = _inputs([10], torch.float32, [0])
    with pytest.raises(ValueError, match="slopes"):
        la.prefill(q, k, v, s[:2], pool, sl, cu)
    with pytest.raises(ValueError, match="state_pool"):
        la.prefill(q, k, v, s, pool[:, :2], sl, cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        la.prefill(q, k, v, s, pool, sl, cu[:1])
    with pytest.raises(ValueError, match="one token per slot"):
        la.decode(q, k, v, s, pool, sl)
    with pytest.raises(ValueError, match="state_pool must be float32"):
        la.prefill(q, k, v, s, pool.half(), sl, cu)
