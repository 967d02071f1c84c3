"""The CUDA lightning-attention kernels against the token recurrence in fp64.

GPU tier (`gpu` marker). Ground truth: `recurrent_prefill` / `recurrent_decode` with a float64 state pool on
the same (rounded) inputs, run on the GPU in fp64. For n = 65536 the fp64 token loop is too slow, so there
the reference is `chunk_prefill` on fp64 inputs with a fp64 pool (the blocked form; it agrees with the
recurrence to ~1e-14, see tests/test_lightning_ops.py).

Tolerances are max|error| / max|reference|:
  bf16 inputs: outputs 4e-3 (rounding the output to bf16 alone costs up to 2^-8 = 3.9e-3), final states 1e-3;
  fp16 inputs: outputs 1e-3 (fp16 output rounding 2^-11), states 1e-4;
  fp32 inputs: outputs and states 1e-4.
Inputs are silu(randn), as the model produces them; decay rates are the real ones of layers 0 and 78
(slopes of the 64-head set; a case with fewer heads takes heads spread over that set).

The CPU tier (unmarked) checks that the package imports and falls back to the reference without the library.
On a machine with a GPU, unbuilt kernels fail the GPU tier (tests/conftest.py), never skip it.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minimax_m1.config import lightning_slopes
from minimax_m1.ops import lightning_attn as la
from minimax_m1.ops.lightning_attn import cuda as la_cuda
from util import needs_hopper, rel_err

OUT_TOL = {torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.float32: 1e-4}
STATE_TOL = {torch.bfloat16: 1e-3, torch.float16: 1e-4, torch.float32: 1e-4}
BLOCK = 32  # the kernel's token block


def _slopes(heads, layer):
    full = torch.tensor(lightning_slopes(64, layer, 80), dtype=torch.float32)
    if heads == 64:
        return full
    return full[torch.linspace(0, 63, heads).round().long()]


def _inputs(lengths, heads=8, dim=128, dtype=torch.bfloat16, layer=0, slots=None, pool_size=None, seed=0,
            state_scale=8.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = sum(lengths)
    q, k, v = (F.silu(torch.randn(t, heads, dim, generator=g, device="cuda")).to(dtype) for _ in range(3))
    n = len(lengths)
    if slots is None:
        slots = list(range(n))
    pool_size = pool_size or max([s for s in slots if s >= 0] + [0]) + 2
    pool = torch.randn(pool_size, heads, dim, dim, generator=g, device="cuda") * state_scale
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    return q, k, v, _slopes(heads, layer).cuda(), pool, torch.tensor(slots, dtype=torch.int32, device="cuda"), cu


def _exact_prefill(q, k, v, slopes, pool, slots, cu):
    p = pool.double()
    o = la.recurrent_prefill(q.double(), k.double(), v.double(), slopes.double(), p, slots, cu)
    return o, p


def _poison_allocator(nbytes):
    """Fill memory the caching allocator will hand out next with NaN, so unwritten outputs show."""
    x = torch.full((nbytes // 4,), float("nan"), device="cuda")
    del x


def _check_prefill(lengths, dtype, heads=8, dim=128, layer=0, slots=None, seg_len=0, seed=0):
    q, k, v, s, pool, sl, cu = _inputs(lengths, heads, dim, dtype, layer, slots, seed=seed)
    ref_o, ref_pool = _exact_prefill(q, k, v, s, pool, sl, cu)
    before = pool.clone()
    _poison_allocator(4 * q.numel() * q.element_size() + (64 << 20))
    o = la_cuda.prefill(q, k, v, s, pool, sl, cu, seg_len=seg_len)
    torch.cuda.synchronize()
    assert o.dtype == dtype and o.shape == q.shape
    assert not o.isnan().any(), "unwritten or NaN outputs"
    err_o = rel_err(o, ref_o)
    used = sorted({x for x in sl.tolist() if x >= 0})
    err_s = rel_err(pool[used], ref_pool[used]) if used else 0.0
    untouched = [i for i in range(pool.shape[0]) if i not in used]
    assert torch.equal(pool[untouched], before[untouched]), "state slots outside the batch changed"
    bounds = cu.tolist()
    for i, slot in enumerate(sl.tolist()):
        if slot < 0:
            assert (o[bounds[i]:bounds[i + 1]] == 0).all(), "padding sequence must give zero output"
    assert err_o <= OUT_TOL[dtype], f"output error {err_o:.2e}"
    assert err_s <= STATE_TOL[dtype], f"state error {err_s:.2e}"
    return err_o, err_s


# ----------------------------------------------------------------------------------------------- CPU tier


def test_import_without_library_falls_back():
    code = (
        "import torch, sys\n"
        "sys.modules['tvm_ffi'] = None\n"  # importing tvm_ffi raises ImportError
        "from minimax_m1.ops import lightning_attn as la\n"
        "assert not la.cuda.available()\n"
        "assert la.cuda.load_error()\n"
        "q = torch.rand(5, 2, 64)\n"
        "pool = torch.zeros(1, 2, 64, 64)\n"
        "o = la.prefill(q, q, q, torch.rand(2), pool, torch.tensor([0], dtype=torch.int32),"
        " torch.tensor([0, 5], dtype=torch.int32))\n"
        "assert o.shape == q.shape\n"
    )
    env = dict(os.environ, MINIMAX_M1_LIGHTNING_LIB="/nonexistent/liblightning_attn.so")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_cpu_tensors_use_reference():
    q = torch.rand(3, 2, 128)
    assert not la_cuda.supports(q, torch.zeros(1, 2, 128, 128))


# ----------------------------------------------------------------------------------------------- GPU tier

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("layer", [0, 78])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 2, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 1, 255, 256, 257, 769])
def test_prefill_lengths(n, dtype, layer):
    _check_prefill([n], dtype, layer=layer, seed=n)


@gpu
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("seg_len", [32, 64, 96])
def test_prefill_segmented(seg_len, dim):
    """Several segments per sequence: pass 1, the segment scan and pass 2 from the scanned state."""
    _check_prefill([1, 300, 65, 700, 0, 33], torch.bfloat16, dim=dim, layer=78, slots=[4, 0, -1, 2, 5, 7],
                   seg_len=seg_len)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_prefill_segmented_split_inputs(dtype):
    _check_prefill([250, 33, 400], dtype, layer=0, slots=[1, 3, 0], seg_len=64)


@gpu
@pytest.mark.parametrize("num_seqs", [1, 3, 17, 64])
def test_prefill_varlen(num_seqs):
    g = torch.Generator().manual_seed(num_seqs)
    lengths = torch.randint(0, 400, (num_seqs,), generator=g).tolist()
    lengths[0] = max(lengths[0], 1)
    if num_seqs > 2:
        lengths[1] = 0
        lengths[2] = 1
    slots = torch.randperm(2 * num_seqs + 3, generator=g)[:num_seqs].tolist()
    if num_seqs > 3:
        slots[3] = -1
    for dtype in (torch.bfloat16, torch.float32):
        _check_prefill(lengths, dtype, heads=4, layer=0, slots=slots, seed=num_seqs)


@gpu
@pytest.mark.parametrize("heads", [8, 64])
@pytest.mark.parametrize("layer", [0, 78])
def test_prefill_long(layer, heads):
    """n = 65536; reference: the blocked fp64 path (the fp64 token loop would take minutes).
    The automatic plan cuts the sequence into segments (pass 1, scan, pass 2): 16 with 8 heads; with 64 heads,
    two on Hopper (the wgmma kernels fit two CTAs per multiprocessor), one elsewhere."""
    n = 65536
    q, k, v, s, pool, sl, cu = _inputs([n], heads=heads, dtype=torch.bfloat16, layer=layer, seed=layer)
    ref_pool = pool.double()
    ref_o = la.reference_prefill(q.double(), k.double(), v.double(), s.double(), ref_pool, sl, cu)
    o = la_cuda.prefill(q, k, v, s, pool, sl, cu)
    err_o, err_s = rel_err(o, ref_o), rel_err(pool[:1], ref_pool[:1])
    assert err_o <= OUT_TOL[torch.bfloat16], f"output error {err_o:.2e}"
    assert err_s <= STATE_TOL[torch.bfloat16], f"state error {err_s:.2e}"


@gpu
@pytest.mark.parametrize("n1,n2", [(1, 1), (31, 33), (100, 300), (256, 513)])
def test_prefill_chunks_compose(n1, n2):
    """prefill(n1) then prefill(n2) == prefill(n1 + n2)."""
    q, k, v, s, pool, sl, _ = _inputs([n1 + n2], dtype=torch.bfloat16, layer=78, seed=n1)
    whole_pool = pool.clone()
    whole = la_cuda.prefill(q, k, v, s, whole_pool, sl, torch.tensor([0, n1 + n2], dtype=torch.int32, device="cuda"))
    a = la_cuda.prefill(q[:n1], k[:n1], v[:n1], s, pool, sl, torch.tensor([0, n1], dtype=torch.int32, device="cuda"))
    b = la_cuda.prefill(q[n1:], k[n1:], v[n1:], s, pool, sl, torch.tensor([0, n2], dtype=torch.int32, device="cuda"))
    assert rel_err(torch.cat([a, b]), whole) <= OUT_TOL[torch.bfloat16]
    assert rel_err(pool[0], whole_pool[0]) <= 1e-5


@gpu
@pytest.mark.parametrize("steps", [1, 5])
def test_prefill_then_decode(steps):
    """prefill(n) then k decode steps == prefill(n + k)."""
    n = 200
    q, k, v, s, pool, sl, _ = _inputs([n + steps], dtype=torch.bfloat16, layer=0, seed=steps)
    whole_pool = pool.clone()
    whole = la_cuda.prefill(q, k, v, s, whole_pool, sl, torch.tensor([0, n + steps], dtype=torch.int32, device="cuda"))
    outs = [la_cuda.prefill(q[:n], k[:n], v[:n], s, pool, sl, torch.tensor([0, n], dtype=torch.int32, device="cuda"))]
    for t in range(n, n + steps):
        outs.append(la_cuda.decode(q[t:t + 1], k[t:t + 1], v[t:t + 1], s, pool, sl))
    assert rel_err(torch.cat(outs), whole) <= OUT_TOL[torch.bfloat16]
    assert rel_err(pool[0], whole_pool[0]) <= 1e-5


@gpu
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_decode(batch, dtype, dim):
    g = torch.Generator().manual_seed(batch)
    slots = torch.randperm(batch + 4, generator=g)[:batch].tolist()
    if batch > 1:
        slots[1] = -1
    q, k, v, s, pool, sl, _ = _inputs([1] * batch, heads=8, dim=dim, dtype=dtype, layer=0, slots=slots, seed=batch)
    ref_pool = pool.double()
    ref_o = la.recurrent_decode(q.double(), k.double(), v.double(), s.double(), ref_pool, sl)
    before = pool.clone()
    o = la_cuda.decode(q, k, v, s, pool, sl)
    used = [x for x in slots if x >= 0]
    untouched = [i for i in range(pool.shape[0]) if i not in used]
    assert rel_err(o, ref_o) <= OUT_TOL[dtype]
    assert rel_err(pool[used], ref_pool[used]) <= 1e-6
    assert torch.equal(pool[untouched], before[untouched])
    if batch > 1:
        assert (o[1] == 0).all()


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_non_contiguous_inputs(dtype):
    """q, k, v as the model makes them (splits of a [T, H, 3D] tensor) and with a strided last dim."""
    t, h, d = 300, 8, 128
    qkv = F.silu(torch.randn(t, h, 3 * d, device="cuda")).to(dtype)
    q, k, v = qkv.split(d, dim=-1)
    _, _, _, s, pool, sl, cu = _inputs([t], heads=h, dim=d, dtype=dtype)
    pool_a, pool_b, pool_c = pool.clone(), pool.clone(), pool.clone()
    o_view = la.prefill(q, k, v, s, pool_a, sl, cu)
    o_copy = la.prefill(q.contiguous(), k.contiguous(), v.contiguous(), s, pool_b, sl, cu)
    assert torch.equal(o_view, o_copy) and torch.equal(pool_a, pool_b)
    wide = F.silu(torch.randn(t, h, 2 * d, device="cuda")).to(dtype)
    qs = wide[..., ::2]  # last-dim stride 2: copied by the wrapper
    o_strided = la.prefill(qs, k, v, s, pool_c, sl, cu)
    o_ref = la.prefill(qs.contiguous(), k, v, s, pool_b.copy_(pool), sl, cu)
    assert torch.equal(o_strided, o_ref)
    dec_slots = torch.tensor([0, -1, 1, -1], dtype=torch.int32, device="cuda")
    start = pool_a.clone()
    od = la.decode(q[:4], k[:4], v[:4], s, pool_a, dec_slots)
    od_ref = la.decode(q[:4].contiguous(), k[:4].contiguous(), v[:4].contiguous(), s, pool_b.copy_(start), dec_slots)
    assert torch.equal(od, od_ref)


@gpu
def test_dispatch_uses_kernels():
    q, k, v, s, pool, sl, cu = _inputs([40], dtype=torch.bfloat16)
    pool2 = pool.clone()
    assert la_cuda.supports(q, pool)
    assert torch.equal(la.prefill(q, k, v, s, pool, sl, cu), la_cuda.prefill(q, k, v, s, pool2, sl, cu))


def _kernel_names(fn, *args, **kwargs):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args, **kwargs)
        torch.cuda.synchronize()
    return " ".join(e.key for e in prof.key_averages())


@gpu
@needs_hopper
def test_hopper_dispatch():
    """On an H100/H200, bf16 head_dim 128 runs the wgmma kernels (both passes); other inputs, and allow_sm90=False
    (MINIMAX_M1_LIGHTNING_SM90=0), the mma.sync ones."""
    names = _kernel_names(la_cuda.prefill, *_inputs([700], dtype=torch.bfloat16), seg_len=256)
    assert "prefill_sm90_state_kernel" in names and "prefill_sm90_output_kernel" in names, names
    names = _kernel_names(la_cuda.prefill, *_inputs([700], dtype=torch.bfloat16), seg_len=256, allow_sm90=False)
    assert "prefill_output_kernel" in names and "sm90" not in names, names
    for dtype, dim in ((torch.float16, 128), (torch.bfloat16, 64)):
        names = _kernel_names(la_cuda.prefill, *_inputs([300], dtype=dtype, dim=dim))
        assert "prefill_output_kernel" in names and "sm90" not in names, names


@gpu
def test_errors_are_clear():
    q, k, v, s, pool, sl, cu = _inputs([40], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="state_pool"):
        la_cuda.prefill(q, k, v, s, pool.transpose(2, 3), sl, cu)
    with pytest.raises(ValueError, match="slopes"):
        la_cuda.prefill(q, k, v, s[:3], pool, sl, cu)


@gpu
def test_cuda_graph_capture():
    """Decode and prefill captured in a CUDA graph give the eager results on replay."""
    q, k, v, s, pool, sl, _ = _inputs([1] * 16, heads=8, dtype=torch.bfloat16, slots=list(range(15)) + [-1])
    pq, pk, pv, _, _, _, pcu = _inputs([100, 30, 1], heads=8, dtype=torch.bfloat16, seed=3)
    psl = torch.tensor([16, 17, -1], dtype=torch.int32, device="cuda")
    pool = torch.cat([pool, torch.randn(2, *pool.shape[1:], device="cuda")])
    start = pool.clone()
    eager_pool = pool.clone()
    eager_d = la.decode(q, k, v, s, eager_pool, sl)
    eager_p = la.prefill(pq, pk, pv, s, eager_pool, psl, pcu)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        la.decode(q, k, v, s, pool.clone(), sl)
        la.prefill(pq, pk, pv, s, pool.clone(), psl, pcu)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_d = la.decode(q, k, v, s, pool, sl)
        out_p = la.prefill(pq, pk, pv, s, pool, psl, pcu)
    pool.copy_(start)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out_d, eager_d) and torch.equal(out_p, eager_p)
    assert torch.equal(pool, eager_pool)


@gpu
def test_torch_compile_sees_through():
    q, k, v, s, pool, sl, cu = _inputs([70, 20], dtype=torch.bfloat16)
    eager_pool = pool.clone()
    eager = la.prefill(q, k, v, s, eager_pool, sl, cu) * 2

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v, s, pool, sl, cu):
        return la.prefill(q, k, v, s, pool, sl, cu) * 2

    assert torch.equal(f(q, k, v, s, pool, sl, cu), eager)
    assert torch.equal(pool, eager_pool)
