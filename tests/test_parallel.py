"""Tensor and expert parallelism at the model level, on 2 and 4 gloo ranks (CPU subprocesses under a hard
timeout, killed on the way out): each rank builds its share of a tiny model that 4 ranks can split, with its
own state slots and KV cache, and runs prompt prefill, chunked prefill and greedy decode of two sequences.

Rank 0's fp32 logits equal TP=1's to 1e-5 and the greedy tokens are identical, for
- tp: attention, vocabulary and experts' intermediate dim split over the ranks;
- ep: experts whole per rank over the same ranks, attention still split (TP+EP, vLLM's --enable-expert-parallel);
- *_kv2: 2 KV heads, so at 4 ranks each KV head is replicated on 2 ranks;
- released / packed / packed_ep (2 ranks): a checkpoint saved in the released per-expert names or in
  transformers' packed experts, loaded slice by slice.
The tolerance: the row-parallel layers, the MoE and the lightning norm sum their partials in another order
than one device does (fp32 rounding, ~2e-6 measured on logits of size ~3).
"""
import pytest
import torch

from parallel_util import assert_close_but_ties, run_ranks, run_spec, split_config, write_checkpoint
from minimax_m1.distributed import MULTI_GPU_ENV, SINGLE

TOL = 1e-5
GPU_TOL = 3e-2  # bf16 (step 3.9e-3): 8 reductions (2 a layer) each round the partials once more than one device
SPECS = {"tp": {"kv_heads": 4, "ep": False}, "ep": {"kv_heads": 4, "ep": True}, "tp_kv2": {"kv_heads": 2, "ep": False}}
CHECKPOINT_SPECS = ("released", "packed", "packed_ep")
CASES = [(2, name) for name in [*SPECS, *CHECKPOINT_SPECS]] + [(4, name) for name in SPECS]


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    released = str(write_checkpoint(split_config(), root / "released", packed=False))
    packed = str(write_checkpoint(split_config(), root / "packed", packed=True))
    return dict(SPECS, released={"checkpoint": released, "ep": False}, packed={"checkpoint": packed, "ep": False},
                packed_ep={"checkpoint": packed, "ep": True})


@pytest.fixture(scope="module")
def references(specs):
    """TP=1 in this process; the packed checkpoint holds the released one's values, so both share a reference."""
    refs = {name: run_spec(spec, 1, SINGLE) for name, spec in specs.items() if name != "packed_ep"}
    refs["packed_ep"] = refs["packed"]
    return refs


@pytest.fixture(scope="module")
def ranks(specs, tmp_path_factory):
    """ranks(n) -> every rank's results of the CASES at n ranks (one run of n processes per n)."""
    done = {}

    def run(n: int) -> list[dict]:
        if n not in done:
            names = [name for m, name in CASES if m == n]
            done[n] = run_ranks(n, {k: specs[k] for k in names}, tmp_path_factory.mktemp(f"ranks{n}"), timeout_s=300)
        return done[n]

    return run


def _close(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape and got.dtype == torch.float32
    return (got - ref).abs().max().item()


@pytest.mark.parametrize("n, name", CASES)
def test_ranks_match_one_device(ranks, references, n, name):
    results = ranks(n)
    ref, got = references[name], results[0][name]
    assert _close(got["prompt"], ref["prompt"]) <= TOL
    assert _close(got["chunked"], ref["chunked"]) <= TOL
    assert _close(got["decode"], ref["decode"]) <= TOL
    assert ref["prompt"].shape[-1] == 251  # the padded vocab tail is cut after the gather
    for r in range(n):  # every rank fed the same greedy tokens; only rank 0 receives logits
        assert results[r][name]["tokens"] == ref["tokens"]
        if r:
            assert results[r][name]["prompt"] is None and results[r][name]["decode"] is None


@pytest.mark.parametrize("n", [2, 4])
def test_each_rank_holds_its_heads(ranks, n):
    results = ranks(n)
    for r in range(n):
        tp, kv2 = results[r]["tp"], results[r]["tp_kv2"]
        assert tp["lightning_heads"] == 8 // n
        assert (tp["kv_heads"], tp["kv_first_head"]) == (4 // n, r * 4 // n)
        # 2 KV heads: split at 2 ranks, replicated at 4 (ranks 0, 1 read head 0; ranks 2, 3 head 1)
        assert (kv2["kv_heads"], kv2["kv_first_head"]) == (1, r * 2 // n)
        assert results[r]["_env"] == MULTI_GPU_ENV


@pytest.mark.gpu
def test_two_ranks_on_one_gpu_run_the_kernels(tmp_path):
    """2 gloo ranks sharing the GPU, in bf16 at head_dim 128: the lightning, paged-attention and fused MoE
    kernels run on per-rank shapes (2 of 4 heads, 1 KV head, I/2 = 64 or 2 whole experts), and the logits
    match TP=1's on the same GPU to the bf16 rounding of the partial sums (decode fed fixed tokens)."""
    specs = {"gpu_tp": {"gpu": True, "ep": False}, "gpu_ep": {"gpu": True, "ep": True}}
    refs = {name: run_spec(spec, 1, SINGLE) for name, spec in specs.items()}
    results = run_ranks(2, specs, tmp_path, timeout_s=300)
    for name in specs:
        for key in ("prompt", "chunked", "decode"):
            assert_close_but_ties(refs[name], results[0][name], key, GPU_TOL, name)
