"""Partial rotary (rotary_dim = head_dim / 2, as in MiniMax-M1), which transformers ignores, checked
against formulas written out here: the op pair by pair, and the whole model through transformers with
its rotary replaced by the partial one."""
import math

import pytest
import torch

from minimax_m1.layers.rotary import PartialRotary


def test_partial_rotary_pairs():
    head_dim, rd, theta = 16, 8, 10_000_000.0
    rope = PartialRotary(head_dim, rd, theta)
    pos = torch.tensor([0, 1, 7, 1000, 65535])
    x = torch.randn(len(pos), 3, head_dim, dtype=torch.float64)
    out = rope(x.float(), *rope.cos_sin(pos)).double()
    expect = x.clone()
    for t, p in enumerate(pos.tolist()):
        for i in range(rd // 2):  # pair (i, i + rd/2) turns by p * theta^(-2i/rd)
            a = p * theta ** (-2 * i / rd)
            x1, x2 = x[t, :, i], x[t, :, i + rd // 2]
            expect[t, :, i] = x1 * math.cos(a) - x2 * math.sin(a)
            expect[t, :, i + rd // 2] = x2 * math.cos(a) + x1 * math.sin(a)
    # fp32 angles at position 65535 carry ~4e-3 absolute phase error, as in the authors' fp32 code
    assert (out - expect).abs().max() < 2e-2
    assert torch.equal(out[..., rd:], x.float().double()[..., rd:])  # the other half passes through
    near = pos < 2000
    assert (out[near] - expect[near]).abs().max() < 2e-4


def test_model_with_partial_rotary_matches_patched_transformers(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from transformers.models.minimax import modeling_minimax

    from hf_util import tiny_hf_model
    from minimax_m1 import LLM

    hf = tiny_hf_model(seed=3)
    head_dim, rd = 16, 8
    theta = hf.config.rope_parameters["rope_theta"]
    hf.model.rotary_emb.inv_freq = 1.0 / (theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))

    def partial_rope(q, k, cos, sin, unsqueeze_dim=1):  # the authors' partial rotary, written out
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

        def rot(x):
            r, rest = x[..., :rd], x[..., rd:]
            half = torch.cat((-r[..., rd // 2:], r[..., :rd // 2]), dim=-1)
            return torch.cat((r * cos + half * sin, rest), dim=-1)
        return rot(q), rot(k)

    monkeypatch.setattr(modeling_minimax, "apply_rotary_pos_emb", partial_rope)
    hf.save_pretrained(tmp_path)
    # our config reader takes the partial factor from rope_parameters
    import json
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"]["partial_rotary_factor"] = rd / head_dim
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    ids = torch.randint(0, 300, (1, 300), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    llm = LLM(str(tmp_path), device="cpu", dtype="float32")
    assert llm.config.rotary_dim == rd
    ours = llm.prompt_logits(ids[0].tolist())
    assert (ours - ref).abs().max().item() < 1e-4
    # and it really differs from rotating the whole head (so the check has teeth)
    monkeypatch.undo()
    hf.model.rotary_emb.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    with torch.no_grad():
        full = hf(ids).logits[0]
    assert (full - ref).abs().max().item() > 1e-2
