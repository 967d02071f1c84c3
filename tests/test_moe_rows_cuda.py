"""The row kernels of the large-batch MoE path (csrc/moe/rows.cu) against their torch compositions.

GPU tier (`gpu` marker):
- fp8_rows with an index: bit-identical to quantize_fp8_rows(x[index]) (both: amax / 448 and v / a as IEEE
  quotients, e4m3 round to nearest even, saturating), codes and scales; zero rows get scale 1.
- fp8_rows with silu_mul: the activation bf16(silu(g) * u) from fp32 (act_rows), then the same quantisation.
  The kernel's expf and torch's may differ in the last fp32 bit, which can move an activation by one bf16 step
  (2^-8 relative) where it sits at a rounding midpoint: held to at least 99.9% identical codes, every code within
  one e4m3 step (2^-3 relative in the normal range; 2^-9 of the scale below it) and scales within 2^-7.
- combine_rows: bit-identical to the weighted index_add_ (top-2: 0 + p0 + p1 in the same order either way),
  with rows marked pos < 0 contributing nothing.
- The whole fp8 and bf16 large-batch layers agree with the fp32 reference as before (test_quantization.py's
  bounds hold with these kernels inside; here the bf16 layer at 600 tokens against its torch composition).
"""
import pytest
import torch

from minimax_m1.ops import _library
from minimax_m1.ops.moe import cuda as moe_cuda
from minimax_m1.ops.moe.grouped import grouped_experts
from minimax_m1.ops.moe.quantized import act_rows, quantize_fp8_rows

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs an sm_89+ GPU")
    assert moe_cuda.available(), moe_cuda.load_error()


@pytest.mark.parametrize("rows,cols", [(1, 8), (37, 1152), (4096, 6144), (300, 9216)])
def test_fp8_rows_gathered_are_torchs(rows, cols):
    g = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows // 2 + 3, cols, device="cuda", generator=g).to(torch.bfloat16)
    x[1] = 0  # a zero row: scale 1, codes 0
    x[2, : cols // 2] *= 1e4  # saturation is not reached (the scale follows the max), but large values
    index = torch.randint(0, x.shape[0], (rows,), device="cuda", generator=g)
    index[0] = 1
    q, a = moe_cuda.fp8_rows(x, index)
    q_ref, a_ref = quantize_fp8_rows(x[index])
    assert torch.equal(a, a_ref) and a[0] == 1
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("rows,cols", [(5, 1152), (2048, 9216)])
def test_fp8_rows_of_the_activation(rows, cols):
    g = torch.Generator(device="cuda").manual_seed(cols)
    h = (3 * torch.randn(rows, 2 * cols, device="cuda", generator=g)).to(torch.bfloat16)
    q, a = moe_cuda.fp8_rows(h, silu_mul=True)
    q_ref, a_ref = quantize_fp8_rows(act_rows(h))
    assert ((a - a_ref).abs() <= a_ref * 2**-7).all()
    same = (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item()
    assert same >= 0.999, same
    v, v_ref = q.float() * a[:, None], q_ref.float() * a_ref[:, None]
    bound = torch.maximum(v_ref.abs() * 2**-3, a_ref[:, None] * 2**-9) * 1.01 + (a - a_ref).abs()[:, None] * 448
    assert ((v - v_ref).abs() <= bound).all()


def test_fp8_rows_check_their_arguments():
    x = torch.randn(4, 12, device="cuda").to(torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 8"):
        moe_cuda.fp8_rows(x)
    with pytest.raises(ValueError, match="int64"):
        moe_cuda.fp8_rows(torch.randn(4, 16, device="cuda").to(torch.bfloat16),
                          torch.zeros(3, dtype=torch.int32, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,hidden", [(1, 8), (513, 6144)])
def test_combine_is_the_weighted_index_add(dtype, tokens, hidden):
    g = torch.Generator(device="cuda").manual_seed(tokens)
    top_k = 2
    y = torch.randn(tokens * top_k, hidden, device="cuda", generator=g).to(dtype)
    order = torch.randperm(tokens * top_k, device="cuda", generator=g)
    weights = torch.rand(tokens, top_k, device="cuda", generator=g)
    valid = torch.rand(tokens * top_k, device="cuda", generator=g) > 0.2
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device="cuda")
    out = moe_cuda.combine_rows(y, torch.where(valid, pos, -1).view(tokens, top_k), weights)
    # the torch composition: the sorted rows weighted in fp32, invalid ones zeroed, index_add_ into zeros
    w = weights.flatten()[order, None]
    yy = torch.where(valid[order][:, None], y.float() * w, 0.0)
    ref = torch.zeros(tokens, hidden, device="cuda").index_add_(0, order // top_k, yy).to(dtype)
    assert torch.equal(out, ref)


def test_grouped_layer_with_the_kernels_is_the_torch_composition():
    """bf16 experts at 600 tokens: the combine kernel in place of index_add_ changes no bit."""
    g = torch.Generator(device="cuda").manual_seed(0)
    E, H, I, T = 8, 512, 384, 600
    x = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H**0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) / I**0.5).to(torch.bfloat16)
    experts = torch.stack([torch.randperm(E, device="cuda", generator=g)[:2] for _ in range(T)])
    weights = torch.rand(T, 2, device="cuda", generator=g)
    fast = grouped_experts(x, experts, weights, w13, w2)
    _library.FUSED_OPS, saved = False, _library.FUSED_OPS
    try:
        slow = grouped_experts(x, experts, weights, w13, w2)
    finally:
        _library.FUSED_OPS = saved
    assert torch.equal(fast, slow)
