"""The package's CUDA kernel libraries: minimax_m1/_kernels/<name>.so (built by `pip install` where nvcc is
present) or the path in an environment variable, loaded through apache-tvm-ffi on first use. Loading never
raises: without the library, tvm_ffi or a CUDA device, `available()` is False and callers keep their torch
path; `load_error()` says why."""
from __future__ import annotations

import os
import pathlib

import torch

KERNELS_DIR = pathlib.Path(__file__).resolve().parents[1] / "_kernels"


class KernelLibrary:
    def __init__(self, filename: str, env: str):
        self.filename, self.env = filename, env
        self._module = None
        self._error: str | None = None
        self._tried = False

    def path(self) -> pathlib.Path:
        override = os.environ.get(self.env)
        return pathlib.Path(override) if override else KERNELS_DIR / self.filename

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
                except Exception as exc:  # no tvm_ffi, or a library built against another ABI
                    self._error = f"loading {path} failed: {type(exc).__name__}: {exc}"
        return self._module

    def available(self) -> bool:
        """True when the library is loaded and a CUDA device is present."""
        return torch.cuda.is_available() and self.load() is not None

    def load_error(self) -> str | None:
        """Why `available()` is False (None when the library loaded)."""
        self.load()
        return self._error


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
