"""Several answers to one prompt (n, best_of): one engine request per answer, then the n to keep. The offline
API and the server share this, so both answer the same way."""
from __future__ import annotations

import dataclasses

from ..sampling_params import SamplingParams


def choice_params(p: SamplingParams, copy: int) -> SamplingParams:
    """The settings of engine request `copy` of p.num_samples: one answer each (with a seed, answer i uses
    seed + i, so that each is reproducible and they differ); prompt logprobs on the first only (they are the
    same for every copy); the sampled tokens' logprobs where best_of must rank the answers."""
    one = p.for_choice(copy) if p.num_samples > 1 else p
    if copy == 0 and p.prompt_logprobs is not None:
        one = dataclasses.replace(one, prompt_logprobs=p.prompt_logprobs)
    if p.num_samples > p.n and one.logprobs is None:
        one = dataclasses.replace(one, logprobs=0)
    return one


def keep_best(answers: list, n: int) -> list:
    """CompletionOutputs (with cumulative_logprob) of one prompt -> the n to return, renumbered: the n most
    likely when best_of sampled more."""
    if len(answers) > n:
        answers = sorted(answers, key=lambda a: -a.cumulative_logprob)[:n]
    return [dataclasses.replace(a, index=i) for i, a in enumerate(answers)]
