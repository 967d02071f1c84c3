"""The package's CUDA kernel libraries and the switches that steer them, read in this one place.

Each library is minimax_m1/_kernels/<name>.so (built by `pip install` where nvcc is present) or the path in
its environment variable, loaded through apache-tvm-ffi on first use. Loading never raises: without the
library, tvm_ffi or a CUDA device, `available()` is False and callers keep their torch path; `load_error()`
says why. What a library's kernels serve (head dims, dtypes, row limits, alignment) comes from its
`<prefix>_limits()` export, read once by `limits()`: Python never copies a C++ constant.

Environment switches, read once when this module is imported:
    MINIMAX_M1_LIGHTNING_SM90=0  lightning prefill keeps the mma.sync kernels where the Hopper ones could run
    MINIMAX_M1_MOE_PDL=0         the fused MoE kernels launch one after the other (no programmatic dependent launch)
    MINIMAX_M1_FUSED_OPS=0       the norm, router, rotary and GEMV ops run their torch references (A/B timings)
    MINIMAX_M1_FUSED_PDL=0       those ops' kernels and the lightning decode launch one after the other (no
                                 programmatic dependent launch)
    MINIMAX_M1_LIGHTNING_LIB, MINIMAX_M1_PAGED_ATTN_LIB, MINIMAX_M1_MOE_LIB, MINIMAX_M1_NORM_LIB,
    MINIMAX_M1_ROUTER_LIB, MINIMAX_M1_ROTARY_LIB, MINIMAX_M1_GEMV_LIB: a library path instead of the built one
"""
from __future__ import annotations

import os
import pathlib

import torch

KERNELS_DIR = pathlib.Path(__file__).resolve().parents[1] / "_kernels"


def _switch(name: str) -> bool:
    """An on/off environment switch, on unless set to "0"."""
    return os.environ.get(name, "1") != "0"


LIGHTNING_SM90 = _switch("MINIMAX_M1_LIGHTNING_SM90")
MOE_PDL = _switch("MINIMAX_M1_MOE_PDL")
FUSED_OPS = _switch("MINIMAX_M1_FUSED_OPS")
FUSED_PDL = _switch("MINIMAX_M1_FUSED_PDL")


class KernelLibrary:
    def __init__(self, filename: str, env: str, limits_function: str):
        self.filename, self.env, self.limits_function = filename, env, limits_function
        self._path = os.environ.get(env)
        self._module = None
        self._limits: dict | None = None
        self._error: str | None = None
        self._tried = False

    def path(self) -> pathlib.Path:
        return pathlib.Path(self._path) if self._path else KERNELS_DIR / self.filename

    def load(self):
        """The tvm-ffi module, or None."""
        if not self._tried:
            self._tried = True
            path = self.path()
            if not path.is_file():
                self._error = (f"{path} does not exist (build with `pip install .` where nvcc is present, "
                               f"or set {self.env})")
            else:
                try:
                    import tvm_ffi

                    self._module = tvm_ffi.load_module(str(path))
                    self._limits = _to_python(getattr(self._module, self.limits_function)())
                except Exception as exc:  # no tvm_ffi, or a library built against another ABI or source
                    self._module = None
                    self._error = f"loading {path} failed: {type(exc).__name__}: {exc}"
        return self._module

    def available(self) -> bool:
        """True when the library is loaded and a CUDA device is present."""
        return torch.cuda.is_available() and self.load() is not None

    def load_error(self) -> str | None:
        """Why `available()` is False (None when it is True)."""
        if self.load() is not None and not torch.cuda.is_available():
            return "the library loaded, but there is no CUDA device"
        return self._error

    def limits(self) -> dict:
        """What the kernels serve, as the library reports it (dtypes as torch dtypes, lists as tuples)."""
        if self.load() is None:
            raise RuntimeError(f"the kernel library is not loaded: {self._error}")
        return self._limits

    def limits_if_loaded(self) -> dict | None:
        """`limits()`, or None without the library."""
        return self._limits if self.load() is not None else None


def _to_python(limits) -> dict:
    out = {}
    for key, value in limits.items():
        if isinstance(value, (int, str)):
            out[str(key)] = value
        else:
            names = str(key) == "dtypes" or str(key).endswith("_dtypes")  # lists of torch dtype names
            out[str(key)] = tuple(getattr(torch, v) if names else int(v) for v in value)
    return out


def custom_op(name: str, impl, fake, mutates_args=()):
    """Registers `impl` as the torch custom op `name` (fake implementation `fake`) and returns the function to
    call: the custom op while torch.compile traces (so compiled graphs see through it), `impl` itself
    otherwise, since eager calls and CUDA graph captures need no dispatcher and it costs ~45 us of host time
    per call."""
    op = torch.library.custom_op(name, impl, mutates_args=mutates_args)
    op.register_fake(fake)

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else impl(*args)

    return call
