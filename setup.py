"""Build script: the package metadata lives in pyproject.toml; this file only adds the CUDA kernels.

`pip install .` / `pip install -e .` compile each folder of csrc/ (KERNEL_LIBS) into minimax_m1/_kernels/lib*.so
with nvcc where a GPU is visible (or when asked), and install a CPU-only package otherwise. Each library links
against the CUDA runtime (statically) and apache-tvm-ffi only, never libtorch. The compile takes minutes on a few
cores, so a machine without a GPU (where the kernels could not run) skips it unless asked. Environment:

    MINIMAX_M1_BUILD_CUDA          unset: build where nvcc is found and a GPU is visible (/dev/nvidia0 or
                                   `nvidia-smi -L`); 1: build (for a GPU-less build machine or CI; fails
                                   without nvcc); 0: never build
    MINIMAX_M1_CUDA_ARCHS="80;90a" target architectures (';' or ',' separated); "90a" enables Hopper-only code
    NVCC / CUDA_HOME               which nvcc to use (default: CUDA_HOME/bin/nvcc, then PATH)
    MINIMAX_M1_NVCC_JOBS           parallel nvcc processes (default: CPU count)

When the kernels are built and one fails to compile, the install fails: a broken kernel is an error, not a
silent CPU fallback. pip hides a build's output unless `pip install -v`; the line announcing the compile is also
written to the terminal (/dev/tty) so that a plain `pip install` shows why it takes minutes.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
# One shared library per csrc/<folder>/ (its *.cu files and those of csrc/common/, headers from csrc/include),
# placed in minimax_m1/_kernels/.
KERNEL_LIBS = {
    "lightning_attn": "liblightning_attn",
    "paged_attention": "libpaged_attn",
    "moe": "libmoe",
    "norm": "libnorm",
    "router": "librouter",
    "rotary": "librotary",
    "gemv": "libgemv",
}
DEFAULT_ARCHS = "80;90a"


def find_nvcc():
    for candidate in (os.environ.get("NVCC"), os.environ.get("CUDA_HOME") and os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")):
        if candidate and os.path.isfile(candidate):
            return candidate
    return shutil.which("nvcc") or (os.path.isfile("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc") or None


def gencode_flags(spec):
    flags = []
    for arch in spec.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        if not arch.rstrip("af").isdigit():
            raise ValueError(f"MINIMAX_M1_CUDA_ARCHS: bad architecture {arch!r} (expected e.g. 80, 90a)")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if arch == "90a":  # the launchers may pick the wgmma kernels (their bodies exist only in sm_90a code)
            flags.append("-DMINIMAX_M1_HAS_SM90A=1")
    if not flags:
        raise ValueError("MINIMAX_M1_CUDA_ARCHS names no architecture")
    return flags


def tvm_ffi_paths():
    """Include and library folders of apache-tvm-ffi, found without importing it (no torch needed)."""
    spec = importlib.util.find_spec("tvm_ffi")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    include, lib = root / "include", root / "lib"
    if not (include / "tvm" / "ffi" / "function.h").is_file() or not (lib / "libtvm_ffi.so").is_file():
        return None
    return include, lib


class CUDAExtension(Extension):
    """Built by nvcc from csrc/<folder> (see BuildExt); setuptools only places the result."""

    def __init__(self, folder, library):
        super().__init__(f"minimax_m1._kernels.{library}", sources=[])
        self.folder = folder


def announce(line: str) -> None:
    """A line the user sees: stderr (pip shows it with -v, or when the build fails) and, since pip captures a
    build's output, the controlling terminal when there is one."""
    print(line, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(f"\n{line}\n")
    except OSError:  # no terminal: CI, a build service
        pass


def gpu_visible() -> bool:
    if os.path.exists("/dev/nvidia0"):
        return True
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and "GPU" in r.stdout


class BuildExt(build_ext):
    def run(self):
        if any(isinstance(ext, CUDAExtension) for ext in self.extensions):
            archs = os.environ.get("MINIMAX_M1_CUDA_ARCHS", DEFAULT_ARCHS)
            announce(f"minimax-m1: compiling the CUDA kernels with nvcc for MINIMAX_M1_CUDA_ARCHS={archs} (minutes on "
                     "a few cores; MINIMAX_M1_BUILD_CUDA=0 skips them, pip install -v shows progress)")
        super().run()

    def get_ext_filename(self, fullname):
        if fullname.split(".")[-1] in KERNEL_LIBS.values():
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def copy_extensions_to_source(self):
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:  # the kernels' folder holds no Python file, so it may not exist yet
            package = ".".join(self.get_ext_fullname(ext.name).split(".")[:-1])
            Path(build_py.get_package_dir(package)).mkdir(parents=True, exist_ok=True)
        super().copy_extensions_to_source()

    def build_extension(self, ext):
        if not isinstance(ext, CUDAExtension):
            return super().build_extension(ext)
        nvcc = find_nvcc()
        include, lib = tvm_ffi_paths()
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.build_temp) / "csrc" / ext.folder
        tmp.mkdir(parents=True, exist_ok=True)
        sources = sorted((ROOT / "csrc" / ext.folder).glob("*.cu")) + sorted((ROOT / "csrc" / "common").glob("*.cu"))
        flags = [
            "-std=c++17", "-O3", "-DNDEBUG", "-lineinfo", "-Xcompiler", "-fPIC",
            f"-I{ROOT / 'csrc' / 'include'}", f"-I{include}",
            *gencode_flags(os.environ.get("MINIMAX_M1_CUDA_ARCHS", DEFAULT_ARCHS)),
        ]

        def compile_one(src):
            obj = tmp / f"{src.parent.name}.{src.stem}.o"
            cmd = [nvcc, *flags, "-c", str(src), "-o", str(obj)]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            return obj

        jobs = int(os.environ.get("MINIMAX_M1_NVCC_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            objects = list(pool.map(compile_one, sources))
        link = [nvcc, "-shared", "-o", str(out), *map(str, objects), f"-L{lib}", "-ltvm_ffi"]
        print(" ".join(link), flush=True)
        subprocess.run(link, check=True)


def ext_modules():
    request = os.environ.get("MINIMAX_M1_BUILD_CUDA", "").strip().lower()
    if request in ("0", "false", "no", "off"):
        print("minimax-m1: MINIMAX_M1_BUILD_CUDA=0, installing without CUDA kernels", file=sys.stderr)
        return []
    asked = request in ("1", "true", "yes", "on")
    if request and not asked:
        raise SystemExit(f"minimax-m1: MINIMAX_M1_BUILD_CUDA={request!r}: use 1 (build the kernels), 0 (skip them) "
                         "or leave it unset (build where a GPU is visible)")
    missing = None
    if find_nvcc() is None:
        missing = "nvcc not found (set CUDA_HOME or NVCC)"
    elif tvm_ffi_paths() is None:
        missing = "apache-tvm-ffi not importable in the build environment"
    if missing and asked:
        raise SystemExit(f"minimax-m1: MINIMAX_M1_BUILD_CUDA=1 asks for the CUDA kernels, but {missing}")
    if missing:
        print(f"minimax-m1: {missing}, installing without CUDA kernels", file=sys.stderr)
        return []
    if not asked and not gpu_visible():
        print("minimax-m1: no GPU visible, installing without CUDA kernels (MINIMAX_M1_BUILD_CUDA=1 builds them)",
              file=sys.stderr)
        return []
    return [CUDAExtension(folder, library) for folder, library in KERNEL_LIBS.items()]


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildExt})
