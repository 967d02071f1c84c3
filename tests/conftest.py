import gc
import os
import pathlib

import pytest
import torch

from util import unloaded_kernels

# The released model's config.json, model.safetensors.index.json and tokenizer_config.json (no weights):
# $MINIMAX_M1_SHARED_DIR, else shared/minimax-m1 beside the checkout.
SHARED = pathlib.Path(os.environ.get("MINIMAX_M1_SHARED_DIR")
                      or pathlib.Path(__file__).resolve().parents[2] / "shared" / "minimax-m1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_model_dir():
    """The released model's config/index/tokenizer_config (SHARED); the test skips, saying how to get them,
    where they are absent."""
    names = ("config.json", "model.safetensors.index.json", "tokenizer_config.json")
    missing = [name for name in names if not (SHARED / name).is_file()]
    if missing:
        pytest.skip(f"needs MiniMax-M1's {', '.join(missing)} (no weights): download them from "
                    f"huggingface.co/MiniMaxAI/MiniMax-M1-80k into {SHARED}, or set MINIMAX_M1_SHARED_DIR to the "
                    "folder that holds them")
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
