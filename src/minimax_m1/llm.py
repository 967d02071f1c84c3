"""Offline API: LLM(model).generate(...), .chat(...), .prompt_logits(...)."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import torch

from .engine.builder import EngineArgs, build_engine
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    """model: a checkpoint directory or a preset name ("tiny"; "minimax-m1" with load_format="dummy").
    device defaults to CUDA when present; dtype to bf16 on CUDA and fp32 on CPU. Other keyword arguments
    are EngineArgs (max_num_seqs, max_num_batched_tokens, max_model_len, gpu_memory_utilization, ...)."""

    def __init__(self, model: str, *, device: str | None = None, dtype: str | torch.dtype | None = None, **kwargs):
        self.args = EngineArgs(model=model, device=device, dtype=dtype, **kwargs)
        self.engine = build_engine(self.args)
        self.tokenizer = self.engine.tokenizer
        self.config = self.engine.runner.model.config
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompts: str | list[str] | None = None,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                 prompt_token_ids: list[int] | list[list[int]] | None = None) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order; `.outputs[0].token_ids` and `.outputs[0].text`."""
        requests = self._requests(prompts, prompt_token_ids)
        params = _per_request(sampling_params, len(requests))
        ids = []
        try:
            for (text, tokens), p in zip(requests, params):
                rid = f"offline-{next(self._ids)}"
                self.engine.add_request(rid, tokens, dataclasses.replace(p, output_kind="final_only"), prompt=text)
                ids.append(rid)
            final: dict[str, RequestOutput] = {}
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return [final[rid] for rid in ids]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
             add_generation_prompt: bool = True, tools: list | None = None) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"}) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt, tools) for c in conversations]
        return self.generate(prompts, sampling_params)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools=None) -> str:
        self._need_tokenizer()
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def stream(self, prompt: str, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the generated text piece by piece as it is produced."""
        (text, tokens), = self._requests(prompt, None)
        rid = f"stream-{next(self._ids)}"
        params = dataclasses.replace(sampling_params or SamplingParams(), output_kind="delta")
        self.engine.add_request(rid, tokens, params, prompt=text)
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.request_id == rid and out.outputs[0].text:
                        yield out.outputs[0].text
        finally:
            self.engine.abort_request(rid)

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Next-token logits at every prompt position: [len(token_ids), vocab] fp32."""
        return self.engine.prompt_logits(list(token_ids))

    # ---- helpers ------------------------------------------------------------------------------

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"{self.args.model} has no tokenizer.json: pass prompt_token_ids instead of text")

    def _requests(self, prompts, prompt_token_ids) -> list[tuple[str | None, list[int]]]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompts and prompt_token_ids")
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompts must be strings (use prompt_token_ids for token ids)")
            self._need_tokenizer()
            return [(p, self.tokenizer.encode(p)) for p in prompts]
        ids = list(prompt_token_ids)
        if ids and isinstance(ids[0], int):
            ids = [ids]
        return [(None, list(t)) for t in ids]


def _per_request(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return params
