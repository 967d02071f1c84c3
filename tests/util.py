"""What the test files share: the error measure, and the rules for GPU-only and hardware-specific tests."""
import pytest
import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, computed in float64; out must be finite (a NaN or inf fails here by name)."""
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def kernel_bindings():
    """The bindings of the package's CUDA kernel libraries (each has available() and load_error())."""
    from minimax_m1.ops.gemv import cuda as gemv_cuda
    from minimax_m1.ops.lightning_attn import cuda as lightning_cuda
    from minimax_m1.ops.moe import cuda as moe_cuda
    from minimax_m1.ops.norm import cuda as norm_cuda
    from minimax_m1.ops.paged_attention import cuda as paged_cuda
    from minimax_m1.ops.rotary import cuda as rotary_cuda
    from minimax_m1.ops.router import cuda as router_cuda

    return {"lightning_attn": lightning_cuda, "paged_attention": paged_cuda, "moe": moe_cuda, "norm": norm_cuda,
            "router": router_cuda, "rotary": rotary_cuda, "gemv": gemv_cuda}


def unloaded_kernels() -> dict[str, str]:
    """Library name -> why it did not load, for each kernel library that is not available."""
    return {name: b.load_error() for name, b in kernel_bindings().items() if not b.available()}


needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                  reason="the wgmma kernels run on compute capability 9.0")


def small_cache_engine(ahead: bool, async_scheduling: bool = False, max_num_seqs: int = 6):
    """The tiny model on the CPU with 16-token KV blocks, and 12 of them: decode crosses block boundaries often
    and preemption happens. ahead: the host half of async scheduling (engine/step_ahead.py), which only CUDA
    engines turn on themselves; async_scheduling: the device half (engine/async_decode.py)."""
    from minimax_m1.engine.builder import EngineArgs, build_engine
    from minimax_m1.engine.step_ahead import StepAhead

    engine = build_engine(EngineArgs(model="tiny", device="cpu", block_size=16, num_kv_blocks=12,
                                     max_num_seqs=max_num_seqs, max_model_len=256, progress=False,
                                     async_scheduling=async_scheduling))
    engine.runner.ahead = StepAhead(engine.runner) if ahead else None
    return engine
