import math
import types

import torch

from minimax_m1 import SamplingParams
from minimax_m1.engine.detokenizer import IncrementalDetokenizer
from minimax_m1.layers import sampler
from minimax_m1.layers.sampler import SamplingBatch
from minimax_m1.tokenizer import tiny_tokenizer


def _seq(seed=None, prompt=(), output=(), **params):
    p = SamplingParams(seed=seed, **params)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return types.SimpleNamespace(params=p, generator=gen, token_ids=list(prompt) + list(output),
                                 output_token_ids=list(output))


def sample(logits, seqs):
    """The sampler on the SamplingBatch of these rows."""
    batch = SamplingBatch.build([s.params for s in seqs], [s.generator for s in seqs], [s.token_ids for s in seqs],
                                [s.output_token_ids for s in seqs])
    return sampler.sample(logits, batch)


def _logits(probs):
    return torch.tensor([probs]).log()


def _draws(probs, n=300, **params):
    return {sample(_logits(probs), [_seq(seed=i, **params)])[0][0] for i in range(n)}


def test_filters():
    probs = [0.5, 0.3, 0.15, 0.05]
    assert _draws(probs, top_p=0.7) == {0, 1}
    assert _draws(probs, top_p=0.85) == {0, 1, 2}
    assert _draws(probs, top_k=2) == {0, 1}
    assert _draws(probs, min_p=0.5) == {0, 1}  # keeps p >= 0.5 * 0.5
    assert _draws(probs, min_p=0.2) == {0, 1, 2}
    assert _draws(probs) == {0, 1, 2, 3}


def test_distribution_follows_probs():
    probs = [0.7, 0.2, 0.1]
    n = 3000
    counts = [0, 0, 0]
    for i in range(n):
        counts[sample(_logits(probs), [_seq(seed=i)])[0][0]] += 1
    for c, p in zip(counts, probs):
        assert abs(c / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_temperature_sharpens_and_greedy_is_argmax():
    probs = [0.4, 0.35, 0.25]
    assert _draws(probs, temperature=0.01) == {0}
    assert sample(_logits(probs), [_seq(temperature=0)])[0] == [0]


def test_rows_are_independent_of_the_batch():
    logits = torch.randn(5, 50)
    seqs = [_seq(seed=11, temperature=0.9), _seq(temperature=0), _seq(seed=5, top_p=0.8)]
    together = sample(logits[:3].clone(), seqs)[0]
    alone = [sample(logits[i:i + 1].clone(), [s])[0][0] for i, s in enumerate(
        [_seq(seed=11, temperature=0.9), _seq(temperature=0), _seq(seed=5, top_p=0.8)])]
    assert together == alone


def test_penalties():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1]])
    # repetition: the seen positive logit is divided, the seen negative one multiplied
    assert sample(logits.clone(), [_seq(prompt=[0], temperature=0, repetition_penalty=2.0)])[0] == [1]
    assert sample(logits.clone(), [_seq(prompt=[0, 1], output=[2], temperature=0, repetition_penalty=3.0)])[0] == [0]
    # presence and frequency count output tokens only
    assert sample(logits.clone(), [_seq(output=[0], temperature=0, presence_penalty=0.2)])[0] == [1]
    assert sample(logits.clone(), [_seq(prompt=[0], temperature=0, presence_penalty=0.2)])[0] == [0]
    assert sample(logits.clone(), [_seq(output=[0, 0], temperature=0, frequency_penalty=0.06)])[0] == [1]
    assert sample(logits.clone(), [_seq(output=[0], temperature=0, frequency_penalty=0.06)])[0] == [0]


def test_logprobs():
    logits = torch.randn(2, 30)
    tokens, lps = sample(logits.clone(), [_seq(seed=1, logprobs=3), _seq(temperature=0)])
    ref = logits[0].log_softmax(-1)
    assert lps[1] is None
    assert tokens[0] in lps[0] and abs(lps[0][tokens[0]] - ref[tokens[0]].item()) < 1e-6
    top = ref.topk(3)
    for i, v in zip(top.indices.tolist(), top.values.tolist()):
        assert abs(lps[0][i] - v) < 1e-6


def test_detokenizer_never_splits_utf8():
    tok = tiny_tokenizer()
    text = "héllo 你好 🎉 done"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode())  # byte-level: one token per byte
    d = IncrementalDetokenizer(tok, tok.encode("prompt "))
    deltas = [d.add(i) for i in ids]
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) == text == d.text
    # the 4-byte emoji arrives whole in one delta
    assert "🎉" in deltas
