import gc
import pathlib

import pytest
import torch

from util import unloaded_kernels

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "minimax-m1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_model_dir():
    """The released model's config/index/tokenizer_config, present on the developers' machines only."""
    names = ("config.json", "model.safetensors.index.json", "tokenizer_config.json")
    if not all((SHARED / name).exists() for name in names):
        pytest.skip(f"{SHARED} is absent (it ships with the developers' checkout only)")
    return SHARED


@pytest.fixture(autouse=True)
def _release_gpu_memory(request):
    """GPU tests start from a clean device: engines of earlier tests (kept alive by reference cycles) and the
    caching allocator's blocks would otherwise count as used memory when an engine sizes its caches from
    gpu_memory_utilization (on an 80 GB card the tiny engines of test_weights got a zero budget)."""
    if "gpu" in request.keywords and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
    yield


@pytest.fixture(autouse=True)
def _gpu_tier_needs_kernels(request):
    """The GPU tier runs against the built kernels: on a machine with a GPU, a missing or broken kernel library
    fails every GPU test with its load error (a skip would let an unbuilt package pass for a tested one)."""
    if "gpu" in request.keywords and torch.cuda.is_available():
        missing = unloaded_kernels()
        if missing:
            pytest.fail("CUDA kernels not loaded on a machine with a GPU: "
                        + "; ".join(f"{name}: {why}" for name, why in missing.items()), pytrace=False)
    yield
