"""8-bit experts: the formats, their error against bf16/fp32 on the same weights, the torch paths against the fp32
oracle of the format, and the layer's parameters and scales under TP and EP.

Tolerances come from the formats (ops/moe/quantized.py):
- one weight (or activation) element v with scale s: int8 |v - q s| <= s / 2; e4m3 <= 2^-4 |v| where |v / s| >=
  2^-6 (normal), <= 2^-10 s below (half the subnormal step 2^-9); both plus 2^-22 |v| for fp32's rounding of
  v / s and q * s. Asserted element by element.
- a MoE layer: the rounding errors are fixed once the weights are, but spread like independent uniform errors
  within one step, so each has variance step^2 / 12 (int8: step s; e4m3: its spacing at v, 2^(floor(log2|v/s|) - 3)
  s in the normal range, 2^-9 s below). Propagated to first order through w1/w3, silu(g) * u, the fp8 activation
  quantisation, w2 and the routing weights, that predicts the mean square error of the layer's output;
  `predicted_mse` computes it from the weights and the inputs alone. The measured rms error must be within 15%
  of the predicted one (it is within 3% over seeds: the estimate averages ~10^5 weight errors), so a wrong
  scale (2x), a missed activation quantisation or an unquantised path fails.
- logits of the tiny model: the MoE errors of its layers add in quadrature (independent roundings) and DeepNorm's
  post-norm residual (alpha > 1 on the normed path) passes each on with a gain below 1, so the logits' relative
  rms error is at most sqrt(sum over layers of each MoE output's relative mse), measured per layer by hooks.
- a torch path against the oracle of its format on the CPU in fp32: 1e-5 of max|oracle| (summation order only).
"""
import dataclasses
import math
import types

import pytest
import torch

from minimax_m1 import LLM
from minimax_m1.config import ConfigError, ParallelConfig, QuantConfig, tiny_config
from minimax_m1.distributed import emulated
from minimax_m1.engine.builder import EngineArgs
from minimax_m1.layers.moe import SparseMoE
from minimax_m1.models.minimax_m1 import MiniMaxM1ForCausalLM
from minimax_m1.ops.moe import (grouped_experts, moe_experts, moe_experts_quantized, reference_experts,
                                reference_quantized_experts, use_fused_quantized)
from minimax_m1.ops.moe import quantized as q8
from minimax_m1.timing import capture_graph
from minimax_m1.weights import init_dummy
from parallel_util import split_config
from util import rel_err

METHODS = ("experts_int8", "fp8")
SMALL = dict(experts=8, hidden=256, inter=320)


def _ulp_fp8(v: torch.Tensor) -> torch.Tensor:
    """e4m3's spacing at v (v in units of the scale): 2^(e - 3) in the normal range, 2^-9 below 2^-6."""
    return torch.exp2(torch.floor(torch.log2(v.abs().double().clamp_min(2.0 ** -6))) - 3)


def _rounding_variance(v: torch.Tensor, scale: torch.Tensor, method: str) -> torch.Tensor:
    """Variance of one element's rounding error (step^2 / 12), v [..., K] with per-row scale [...]."""
    s = scale.double()[..., None]
    step = s.expand(v.shape) if method == "experts_int8" else _ulp_fp8(v.double() / s) * s
    return step ** 2 / 12


def predicted_mse(x, experts, weights, w13, w2, method) -> torch.Tensor:
    """First-order mean square error [T, H] of the quantised layer's output against exact arithmetic on the float
    weights (see the module docstring)."""
    inter = w2.shape[2]
    _, s13 = q8.quantize_weight(w13, method)
    _, s2 = q8.quantize_weight(w2, method)
    v13, v2 = _rounding_variance(w13, s13, method), _rounding_variance(w2, s2, method)
    vx = torch.zeros_like(x, dtype=torch.float64)
    if method == "fp8":
        vx = _rounding_variance(x, q8.quantize_fp8_rows(x)[1], method)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in experts.unique().tolist():
        tok, j = (experts == e).nonzero(as_tuple=True)
        xe, w, w_2 = x[tok].double(), w13[e].double(), w2[e].double()
        h = xe @ w.t()
        vh = xe ** 2 @ v13[e].t() + vx[tok] @ (w ** 2).t()
        g, u = h[:, :inter], h[:, inter:]
        sig = torch.sigmoid(g)
        silu, dsilu = g * sig, sig * (1 + g * (1 - sig))
        act = silu * u
        vact = dsilu ** 2 * u ** 2 * vh[:, :inter] + silu ** 2 * vh[:, inter:]
        if method == "fp8":
            vact = vact + _rounding_variance(act, q8.quantize_fp8_rows(act)[1], method)
        vy = vact @ (w_2 ** 2).t() + act ** 2 @ v2[e].t()
        out.index_add_(0, tok, vy * weights[tok, j, None].double() ** 2)
    return out


def _layer(shape=SMALL, seed=0, tokens=64, top_k=2):
    """Uniform weights of N(0, 1/fan_in)'s variance (as the dummy weights), a random router, random inputs."""
    g = torch.Generator().manual_seed(seed)
    e, h, i = shape["experts"], shape["hidden"], shape["inter"]
    w13 = (torch.rand(e, 2 * i, h, generator=g) * 2 - 1) * (3 / h) ** 0.5
    w2 = (torch.rand(e, h, i, generator=g) * 2 - 1) * (3 / i) ** 0.5
    x = torch.randn(tokens, h, generator=g)
    probs = torch.randn(tokens, e, generator=g).softmax(-1)
    weights, experts = probs.topk(top_k, -1)
    return x, experts, weights / weights.sum(-1, keepdim=True), w13, w2


# ---- the formats, element by element ----------------------------------------------------------------

def test_int8_rounding_bound():
    _, _, _, w13, _ = _layer()
    q, s = q8.quantize_weight(w13, "experts_int8")
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == w13.shape[:-1]
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127  # symmetric: -128 is never used
    torch.testing.assert_close(s, w13.abs().amax(-1) / 127, rtol=0, atol=0)
    err = (q8.dequantize_weight(q, s) - w13).abs()
    # s/2, plus fp32's rounding of w / s and of q * s (2^-24 relative each)
    assert bool((err <= s[..., None] / 2 + 2 ** -22 * w13.abs()).all())


def test_fp8_rounding_bound():
    _, _, _, w13, _ = _layer()
    w13 = torch.cat([w13, w13 * 1e-3], 2)  # rows with elements far below their max: e4m3's subnormal range
    q, s = q8.quantize_weight(w13, "fp8")
    assert q.dtype == torch.float8_e4m3fn
    assert float(q.float().abs().max()) == q8.FP8_MAX  # each row's max maps to 448 exactly
    err = (q8.dequantize_weight(q, s) - w13).abs()
    bound = torch.maximum(w13.abs() * 2 ** -4, s[..., None] * 2 ** -10) + 2 ** -22 * w13.abs()
    assert bool((err <= bound).all())
    assert bool(((w13 / s[..., None]).abs() < 2 ** -6).any())  # the subnormal branch was exercised


def test_fp8_rounds_to_nearest_even_and_saturates():
    # in units of the scale: 1.0625 lies halfway between e4m3's 1.0 and 1.125 (ties to the even 1.0), 1.1875
    # between 1.125 and 1.25 (to 1.25); 449 rounds past 448, where the cast alone would give NaN
    v = torch.tensor([[448.0, 1.0625, 1.1875, -3.3, 0.0]])
    q, a = q8.quantize_fp8_rows(v)
    assert float(a) == 1.0
    assert q.float().tolist() == [[448.0, 1.0, 1.25, -3.25, 0.0]]
    sat = q8._round(torch.tensor([[449.0, -500.0]]), torch.ones(1), "fp8")
    assert sat.float().tolist() == [[448.0, -448.0]]


def test_zero_rows():
    q, s = q8.quantize_weight(torch.zeros(3, 8), "experts_int8")
    assert s.tolist() == [1.0, 1.0, 1.0] and int(q.abs().sum()) == 0
    xq, a = q8.quantize_fp8_rows(torch.zeros(2, 16))
    assert a.tolist() == [1.0, 1.0] and float(xq.float().abs().sum()) == 0


def test_unknown_method():
    with pytest.raises(ValueError, match="experts_int8"):
        q8.quantize_weight(torch.ones(2, 2), "int4")
    with pytest.raises(ConfigError, match="fp8, experts_int8"):
        QuantConfig("int4")
    with pytest.raises(ConfigError, match="fp8, experts_int8"):
        EngineArgs(model="tiny", device="cpu", quantization="awq")


# ---- the layer: error against the float weights, predicted from the format ----------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
def test_layer_error_matches_the_format(method, seed):
    x, experts, weights, w13, w2 = _layer(seed=seed)
    q13, s13 = q8.quantize_weight(w13, method)
    q2, s2 = q8.quantize_weight(w2, method)
    got = reference_quantized_experts(x, experts, weights, q13, s13, q2, s2, method).double()
    exact = reference_experts(x, experts, weights, w13, w2).double()
    ratio = math.sqrt(((got - exact) ** 2).mean().item() / predicted_mse(x, experts, weights, w13, w2, method).mean().item())
    assert 0.85 <= ratio <= 1.15, ratio
    rel = math.sqrt(((got - exact) ** 2).mean().item() / (exact ** 2).mean().item())
    print(f"{method} seed {seed}: MoE output relative rms error {rel:.2e} (measured / predicted {ratio:.3f})")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("foreign", [False, True])
def test_torch_path_matches_the_oracle(method, tokens, foreign):
    x, experts, weights, w13, w2 = _layer(tokens=tokens, seed=tokens)
    if foreign:  # another rank's experts (expert parallelism): ids outside [0, E) contribute nothing
        experts = torch.where(torch.arange(tokens)[:, None] % 3 == 0, experts + 100, experts)
        experts[0, 1] = -1
    q13, s13 = q8.quantize_weight(w13, method)
    q2, s2 = q8.quantize_weight(w2, method)
    ref = reference_quantized_experts(x, experts, weights, q13, s13, q2, s2, method)
    got = moe_experts_quantized(x, experts, weights, q13, s13, q2, s2, method, foreign_ids=foreign)
    assert got.dtype == torch.float32
    assert rel_err(got, ref) <= 1e-5


def test_oracle_equals_dequantised_math_for_int8():
    """experts_int8 is exactly the usual math on q * scale (no activation quantisation)."""
    x, experts, weights, w13, w2 = _layer(tokens=9)
    q13, s13 = q8.quantize_weight(w13, "experts_int8")
    q2, s2 = q8.quantize_weight(w2, "experts_int8")
    ref = reference_experts(x, experts, weights, q8.dequantize_weight(q13, s13), q8.dequantize_weight(q2, s2))
    got = reference_quantized_experts(x, experts, weights, q13, s13, q2, s2, "experts_int8")
    assert rel_err(got, ref) <= 1e-6


# ---- the model: parameters, dummy weights, logits ----------------------------------------------------

def _model(config, method, rank=0, world=1, ep=False, dtype=torch.float32, seed=0):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = MiniMaxM1ForCausalLM(config, ParallelConfig(world, ep), emulated(rank, world) if world > 1 else None,
                                     quant=QuantConfig.parse(method))
    finally:
        torch.set_default_dtype(previous)
    init_dummy(model, seed, progress=False)
    return model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dummy_weights_are_the_quantised_float_ones(method, dtype):
    """8-bit dummies are the model dtype's dummies quantised: both models share their weights."""
    cfg = tiny_config(300)
    plain, quant = _model(cfg, None, dtype=dtype), _model(cfg, method, dtype=dtype)
    for a, b in zip(plain.model.layers, quant.model.layers):
        for name in ("w13", "w2"):
            q, s = q8.quantize_weight(getattr(a.block_sparse_moe, name), method)
            assert torch.equal(getattr(b.block_sparse_moe, name).view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(getattr(b.block_sparse_moe, name + "_scale"), s)
        for (name, pa), pb in zip(a.self_attn.named_parameters(), b.self_attn.parameters()):
            assert torch.equal(pa, pb), name  # attention stays as it is
        assert b.block_sparse_moe.gate.weight.dtype == dtype  # the router stays in the model dtype (fp32 softmax)
    assert quant.lm_head.weight.dtype == dtype


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ep", [False, True])
def test_scales_shard_with_their_rows(method, ep):
    """Rank r of 2 holds exactly its slice of the one-device quantisation: under TP w1/w3 rows with their
    scales and w2's columns with all of its (per hidden channel) scales; under EP whole experts."""
    cfg = split_config()
    one = _model(cfg, method).model.layers[0].block_sparse_moe
    i, e = cfg.intermediate_size, cfg.num_local_experts
    for r in range(2):
        m = _model(cfg, method, r, 2, ep).model.layers[0].block_sparse_moe
        if ep:
            experts = slice(r * e // 2, (r + 1) * e // 2)
            want = {n: getattr(one, n)[experts] for n in ("w13", "w13_scale", "w2", "w2_scale")}
        else:
            rows = torch.cat([torch.arange(r * i // 2, (r + 1) * i // 2), i + torch.arange(r * i // 2, (r + 1) * i // 2)])
            want = {"w13": one.w13[:, rows], "w13_scale": one.w13_scale[:, rows],
                    "w2": one.w2[:, :, r * i // 2:(r + 1) * i // 2], "w2_scale": one.w2_scale}
        for n, t in want.items():
            got = getattr(m, n)
            assert got.shape == t.shape, n
            assert torch.equal(got.view(torch.uint8) if got.element_size() == 1 else got,
                               t.view(torch.uint8) if t.element_size() == 1 else t), n


def _moe_errors(model_q, model_f):
    """Hooks that record each layer's relative mse of the quantised experts' output against the float layer's
    on the same input (the quantised model's)."""
    errors, hooks = [], []
    for lq, lf in zip(model_q.model.layers, model_f.model.layers):
        def hook(m, inp, out, ref=lf.block_sparse_moe):
            exact = ref(inp[0]).double()
            errors.append(((out.double() - exact) ** 2).mean().item() / (exact ** 2).mean().item())

        hooks.append(lq.block_sparse_moe.register_forward_hook(hook))
    return errors, hooks


@pytest.mark.parametrize("method", METHODS)
def test_tiny_logits(method):
    ids = [(7 * j + 3) % 250 for j in range(64)]
    base = LLM("tiny", device="cpu", progress=False)
    llm = LLM("tiny", device="cpu", progress=False, quantization=method)
    ref = base.prompt_logits(ids).double()
    errors, hooks = _moe_errors(llm.engine.runner.model, base.engine.runner.model)
    got = llm.prompt_logits(ids).double()
    for h in hooks:
        h.remove()
    d = got - ref
    rel = math.sqrt(d.pow(2).mean().item() / ref.pow(2).mean().item())
    bound = math.sqrt(sum(errors))
    assert 0 < rel <= bound, (rel, bound, errors)
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    agree = (got.argmax(-1) == ref.argmax(-1)).double().mean().item()
    print(f"tiny, {method}: logits relative rms {rel:.2e} (bound {bound:.2e}), max |d| {d.abs().max():.3e}, "
          f"mean |d| {d.abs().mean():.3e}, KL {kl:.2e}, argmax agrees at {agree:.1%}")


def test_layer_keeps_its_structure():
    """SparseMoE's quantised parameters: 8-bit weights, fp32 scales, no gradients, the method's name."""
    cfg = types.SimpleNamespace(num_local_experts=4, hidden_size=64, intermediate_size=32, num_experts_per_tok=2)
    m = SparseMoE(cfg, quant=QuantConfig("fp8"))
    assert m.quant_method.name == "fp8"
    assert {n: (p.dtype, tuple(p.shape)) for n, p in m.named_parameters()} == {
        "gate.weight": (torch.float32, (4, 64)), "w13": (torch.float8_e4m3fn, (4, 64, 64)),
        "w13_scale": (torch.float32, (4, 64)), "w2": (torch.float8_e4m3fn, (4, 64, 32)),
        "w2_scale": (torch.float32, (4, 64))}
    assert not any(p.requires_grad for n, p in m.named_parameters() if n != "gate.weight")


def test_bad_scales_are_refused():
    from minimax_m1.quantization import QuantizationError

    model = _model(tiny_config(300), "experts_int8")
    model.model.layers[1].block_sparse_moe.w2_scale.data[0, 3] = float("nan")
    with pytest.raises(QuantizationError, match="w2_scale"):
        model.process_weights_after_loading()


def test_quantized_model_counts_as_estimated():
    """The memory plan's 8-bit weight bytes (scales included) equal the built model's, per rank of TP and EP."""
    from minimax_m1.engine import memory

    cfg = dataclasses.replace(split_config(), vocab_size=256)
    for world, ep in ((1, False), (2, False), (2, True)):
        with torch.device("meta"):
            m = MiniMaxM1ForCausalLM(cfg, ParallelConfig(world, ep), emulated(0, world) if world > 1 else None,
                                     quant=QuantConfig("fp8"))
        built = sum(p.numel() * p.element_size() for p in m.parameters())
        assert memory.weight_bytes(cfg, torch.float32, world, ep, expert_bits=8) == built, (world, ep)


# ---- GPU: the CUDA paths against the oracle ---------------------------------------------------------

REAL = dict(experts=32, hidden=6144, inter=9216)


def _cuda_layer(shape, tokens, method, seed=0):
    x, experts, weights, w13, w2 = _layer(shape, seed, tokens)
    w13, w2 = w13.cuda().bfloat16(), w2.cuda().bfloat16()  # the bf16 model's weights, quantised
    q13, s13 = q8.quantize_weight(w13, method)
    q2, s2 = q8.quantize_weight(w2, method)
    return x.cuda().bfloat16(), experts.cuda(), weights.cuda(), q13, s13, q2, s2, w13, w2


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("tokens", [1, 64, 129, 512, 600])  # 600: above the fused kernel's 1024 rows
def test_cuda_paths_match_the_oracle(method, tokens):
    """The dispatch (fused kernel where it serves, else _scaled_grouped_mm for fp8 on sm_90 / dequantise-then-
    grouped_mm) in bf16 against the fp32 oracle of the format, in rms. experts_int8 (W8A16) is bf16 arithmetic on
    the weights q * s: its distance from the oracle is the bf16 path's own rounding on those weights (measured
    here: moe_experts on q * s rounded to bf16, against fp32 arithmetic; about 4e-3 relative at real shapes,
    above bf16's unit roundoff, from the roundings of g, u, act and y), plus that weight rounding, 2^-9
    relative. fp8 (W8A8): bf16 rounding of act moves an e4m3 activation to a neighbouring value now and then
    (one step, 2^-3 relative), far above rounding; it stays under half the format's own error (oracle vs the
    float weights)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    x, experts, weights, q13, s13, q2, s2, w13, w2 = _cuda_layer(SMALL, tokens, method)
    got = moe_experts_quantized(x, experts, weights, q13, s13, q2, s2, method)
    ref = reference_quantized_experts(x, experts, weights, q13, s13, q2, s2, method)
    exact = reference_experts(x, experts, weights, w13, w2)
    own = ((ref.double() - exact.double()) ** 2).mean().sqrt()
    assert got.dtype == torch.bfloat16
    dist = ((got.double() - ref.double()) ** 2).mean().sqrt()
    if method == "experts_int8":
        wq13, wq2 = q8.dequantize_weight(q13, s13, torch.bfloat16), q8.dequantize_weight(q2, s2, torch.bfloat16)
        # the same arithmetic as the path that ran: the fused 8-bit kernel's bf16 twin, or torch's grouped path
        twin = moe_experts if use_fused_quantized(x, q13, s13, q2, s2, method, experts.shape[1]) else grouped_experts
        bf16_own = ((twin(x, experts, weights, wq13, wq2).double()
                     - reference_experts(x, experts, weights, wq13, wq2).double()) ** 2).mean().sqrt()
        assert dist <= bf16_own + 2 ** -9 * (ref.double() ** 2).mean().sqrt()
    else:
        assert dist <= 0.5 * own


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_cuda_large_batch_path_in_a_graph(method):
    """The large-batch torch path at real shapes, captured once and replayed with another routing: equal to
    eager calls (nothing read on the host)."""
    from minimax_m1.ops.moe import why_not_capturable

    device = torch.device("cuda")
    assert why_not_capturable(32, 6144, 9216, 2, 256, torch.bfloat16, device, method) is None
    x, experts, weights, q13, s13, q2, s2, _, _ = _cuda_layer(dict(REAL, experts=8), 256, method)
    static = [x.clone(), experts.clone(), weights.clone()]
    run = lambda: q8.quantized_experts(*static, q13, s13, q2, s2, method)  # noqa: E731
    graph, out = capture_graph(run)
    for shift in (0, 3):
        static[1].copy_((experts + shift) % 8)
        graph.replay()
        assert torch.equal(out, q8.quantized_experts(static[0], static[1], static[2], q13, s13, q2, s2, method))


@pytest.mark.gpu
def test_fp8_uses_tensor_cores_on_sm90():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("torch._scaled_grouped_mm's rowwise fp8 path is for sm_90")
    assert q8.scaled_grouped_mm_serves(torch.bfloat16, torch.device("cuda"), 6144, 9216)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ep", [False, True])
def test_layer_partials_sum_to_one_device(method, ep):
    """Given the same input, the 2 ranks' partial MoE outputs (before the all-reduce) sum to the one-device
    layer's: to fp32 rounding for int8 (TP, EP) and fp8 under EP. fp8 under TP quantises each rank's slice of
    the activation on its own (per token, per rank): a finer scale than one device's, so the sum stays within
    the format's error of the float layer (at most its one-device error, plus 10% for the estimate)."""
    cfg = split_config()
    x = torch.randn(19, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    one = _model(cfg, method).model.layers[2].block_sparse_moe
    parts = sum(_model(cfg, method, r, 2, ep).model.layers[2].block_sparse_moe(x) for r in range(2))
    if method == "experts_int8" or ep:
        assert rel_err(parts, one(x)) <= 1e-6
        return
    exact = _model(cfg, None).model.layers[2].block_sparse_moe(x).double()
    own = (one(x).double() - exact).pow(2).mean().sqrt()
    assert 0 < (parts.double() - exact).pow(2).mean().sqrt() <= 1.1 * own
    assert rel_err(parts, one(x)) > 1e-6  # the per-rank activation scales did change the rounding
