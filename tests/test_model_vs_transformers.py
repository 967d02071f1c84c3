"""The whole model against transformers' MiniMaxForCausalLM, which is faithful to the authors' code when
rotary covers the whole head (the case here). fp32 throughout: agreement to 1e-4 in the logits."""
import pytest
import torch

from hf_util import tiny_hf_model
from minimax_m1 import LLM, SamplingParams

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_hf_model()
    path = tmp_path_factory.mktemp("hf-tiny")
    model.save_pretrained(path)
    return model, path


def test_prompt_logits_match(checkpoint):
    hf, path = checkpoint
    ids = torch.randint(0, 300, (1, 650), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits[0].float()
    llm = LLM(str(path), device="cpu", dtype="float32")
    ours = llm.prompt_logits(ids[0].tolist())
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() < 1e-4
    # chunked prefill (state and KV carried across 100-token steps) gives the same logits
    chunked = LLM(str(path), device="cpu", dtype="float32", max_num_batched_tokens=100).prompt_logits(ids[0].tolist())
    assert (chunked - ref).abs().max().item() < 1e-4


def test_greedy_tokens_match(checkpoint):
    hf, path = checkpoint
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, 40:].tolist()
    llm = LLM(str(path), device="cpu", dtype="float32")
    out = llm.generate(prompt_token_ids=ids[0].tolist(),
                       sampling_params=SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert out[0].outputs[0].token_ids == ref
