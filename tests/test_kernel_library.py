"""The kernel libraries seen from Python (ops/_library.py): the environment switches are read once, a missing or
stale library is a load error that says why, and what the kernels serve is read from the built library's
`<prefix>_limits()` export. Where the libraries are built but no GPU is present, the device queries raise an
error naming the device instead of guessing (the launchers used to assume 132 multiprocessors)."""
import os
import subprocess
import sys

import pytest
import torch

from minimax_m1.ops import _library
from util import kernel_bindings

BUILT = {name: b for name, b in kernel_bindings().items() if b._LIBRARY.path().is_file()}
needs_built = pytest.mark.skipif(not BUILT, reason="the CUDA kernels are not built here (no nvcc at install)")
SWITCHES = ("MINIMAX_M1_LIGHTNING_SM90", "MINIMAX_M1_MOE_PDL", "MINIMAX_M1_FUSED_OPS")


@pytest.mark.parametrize("value,expect", [(None, True), ("0", False), ("1", True)])
def test_switch_values(monkeypatch, value, expect):
    if value is None:
        monkeypatch.delenv("MINIMAX_M1_MOE_PDL", raising=False)
    else:
        monkeypatch.setenv("MINIMAX_M1_MOE_PDL", value)
    assert _library._switch("MINIMAX_M1_MOE_PDL") is expect


def test_switches_are_read_at_import():
    env = dict(os.environ, **dict.fromkeys(SWITCHES, "0"))
    code = "from minimax_m1.ops import _library as l; print(l.LIGHTNING_SM90, l.MOE_PDL, l.FUSED_OPS)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False False"


def test_missing_library_says_why():
    lib = _library.KernelLibrary("nonexistent.so", "MINIMAX_M1_TEST_LIB", "nonexistent_limits")
    assert lib.load() is None and not lib.available()
    assert "does not exist" in lib.load_error() and "MINIMAX_M1_TEST_LIB" in lib.load_error()
    assert lib.limits_if_loaded() is None
    with pytest.raises(RuntimeError, match="not loaded"):
        lib.limits()


@needs_built
def test_library_without_its_limits_export_is_a_load_error(monkeypatch):
    """A library from an older build (no limits export) is not used: its limits would be guesses."""
    path = next(iter(BUILT.values()))._LIBRARY.path()
    monkeypatch.setenv("MINIMAX_M1_TEST_LIB", str(path))
    lib = _library.KernelLibrary("unused.so", "MINIMAX_M1_TEST_LIB", "nonexistent_limits")
    assert lib.load() is None and "nonexistent_limits" in lib.load_error()


EXPECTED = {  # the kernels' own constants, as each library must report them
    "lightning_attn": {"head_dims": (64, 128), "dtypes": (torch.bfloat16, torch.float16, torch.float32)},
    "paged_attention": {"head_dims": (64, 128), "dtypes": (torch.bfloat16, torch.float16), "max_group": 16,
                        "block_size_multiple": 16},
    "moe": {"dtypes": (torch.bfloat16, torch.float16), "max_rows": 1024, "max_experts": 256, "size_multiple": 64,
            "tile_rows": 16, "quantized_dtypes": (torch.bfloat16,), "experts_int8_weight_dtypes": (torch.int8,),
            "fp8_weight_dtypes": (torch.float8_e4m3fn,), "quantized_size_multiple": 128, "fp8_min_arch": 89},
    "norm": {"dtypes": (torch.bfloat16, torch.float16), "max_features": 16384, "feature_multiple": 8},
    "router": {"dtypes": (torch.bfloat16, torch.float16), "max_experts": 256, "max_top_k": 8, "hidden_multiple": 8},
    "rotary": {"dtypes": (torch.bfloat16, torch.float16), "head_dim_multiple": 8},
    "gemv": {"dtypes": (torch.bfloat16, torch.float16), "max_tokens": 8, "k_multiple": 8, "max_parts": 3},
}


@needs_built
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_limits_are_read_from_the_library(name):
    if name not in BUILT:
        pytest.fail(f"{name} is not built while {sorted(BUILT)} are")
    assert BUILT[name].limits() == {"row_align_bytes": 16, **EXPECTED[name]}


@needs_built
def test_device_queries_raise_rather_than_guess():
    lightning = BUILT["lightning_attn"]._load()
    with pytest.raises(ValueError, match="device id 70"):
        lightning.lightning_prefill_workspace_bytes(4096, 1, 8, 128, False, 70, 0, True)
    if torch.cuda.is_available():
        assert lightning.lightning_prefill_workspace_bytes(4096, 1, 8, 128, False, 0, 0, True) >= 0
    else:
        with pytest.raises(RuntimeError, match="cuda:0"):
            lightning.lightning_prefill_workspace_bytes(4096, 1, 8, 128, False, 0, 0, True)


def test_gpu_tier_fails_without_kernels(tmp_path):
    """On a machine with a GPU (faked here), a GPU test whose kernels are not loaded fails with the load error."""
    (tmp_path / "fake_gpu.py").write_text(
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "torch.cuda.get_device_capability = lambda *args: (9, 0)\n")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, MINIMAX_M1_MOE_LIB=str(tmp_path / "nonexistent" / "libmoe.so"),
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "fake_gpu", "-p", "no:cacheprovider",
                           os.path.join(tests, "test_moe_cuda.py") + "::test_empty_batch"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tests)
    assert proc.returncode == 1, proc.stdout[-3000:]  # an error at setup, not a skip
    assert "1 error" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]
    assert "CUDA kernels not loaded on a machine with a GPU" in proc.stdout
    assert "moe: " in proc.stdout and "nonexistent" in proc.stdout
