"""Offline API: LLM(model).generate(...), .chat(...), .prompt_logits(...)."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .engine.builder import EngineArgs, build_engine
from .engine.parallel_sampling import choice_params, keep_best
from .outputs import RequestOutput, cumulative_logprob, to_logprobs
from .sampling_params import SamplingParams


class LLM:
    """model: a checkpoint directory or a preset name ("tiny"; "minimax-m1" with load_format="dummy").
    tokenizer: a folder with tokenizer.json to use instead of the model's (for a checkpoint without one).
    device defaults to CUDA when present; dtype to bf16 on CUDA and fp32 on CPU. Other keyword arguments
    are EngineArgs (max_num_seqs, max_num_batched_tokens, max_model_len, gpu_memory_utilization, ...)."""

    def __init__(self, model: str, *, tokenizer: str | None = None, device: str | None = None,
                 dtype: str | torch.dtype | None = None, **kwargs):
        self.args = EngineArgs(model=model, tokenizer=tokenizer, device=device, dtype=dtype, **kwargs)
        self.engine = build_engine(self.args)
        self.tokenizer = self.engine.tokenizer
        self.config = self.engine.runner.model.config
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the worker processes of a tensor_parallel_size > 1 engine now (they also stop at exit)."""
        self.engine.shutdown()

    def get_tokenizer(self):
        return self.tokenizer

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompts: PromptInput | Sequence[PromptInput] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 prompt_token_ids: list[int] | list[list[int]] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order, with `params.n` answers in `.outputs` (`.token_ids`,
        `.text`). A prompt is a string, a list of token ids, {"prompt": text} or {"prompt_token_ids": ids}
        (which may also carry "prompt", the text to report); give one or a list of them. use_tqdm: a
        progress bar (default: when there is more than one prompt)."""
        requests = self._requests(prompts, prompt_token_ids)
        params = _per_request(sampling_params, len(requests))
        copies: list[list[str]] = []  # engine request ids per prompt
        owner: dict[str, int] = {}
        show = len(requests) > 1 if use_tqdm is None else use_tqdm
        try:
            for i, ((text, tokens), p) in enumerate(zip(requests, params)):
                copies.append([])
                base = f"offline-{next(self._ids)}"
                for c in range(p.num_samples):
                    rid = base if p.num_samples == 1 else f"{base}-{c}"
                    self.engine.add_request(rid, tokens, self._engine_params(p, c), prompt=text)
                    copies[-1].append(rid)
                    owner[rid] = i
            final: dict[str, RequestOutput] = {}
            left = [len(c) for c in copies]
            with tqdm(total=len(requests), desc="Processed prompts", unit="prompt", disable=not show) as bar:
                while self.engine.has_unfinished():
                    for out in self.engine.step():
                        if out.finished:
                            final[out.request_id] = out
                            left[owner[out.request_id]] -= 1
                            bar.update(left[owner[out.request_id]] == 0)
        except BaseException:
            for rid in owner:
                self.engine.abort_request(rid)
            raise
        return [self._result(final, ids, p) for ids, p in zip(copies, params)]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             use_tqdm: bool | None = None, chat_template: str | None = None,
             chat_template_kwargs: dict[str, Any] | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list | None = None) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"}, OpenAI-shaped: tool_calls and tool
        results too) or a list of them. chat_template: a Jinja template to use instead of the model's;
        chat_template_kwargs: extra variables for it; continue_final_message: continue the final assistant
        message instead of starting a new one (needs add_generation_prompt=False)."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of messages, or a list of conversations")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt, tools, chat_template=chat_template,
                                            continue_final_message=continue_final_message,
                                            **(chat_template_kwargs or {})) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools=None,
                            **kwargs) -> str:
        """kwargs: chat_template, continue_final_message, and variables for the template."""
        self._need_tokenizer()
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tools=tools, **kwargs)

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
            raise ValueError(f"{self.args.model} has no tokenizer.json: pass token ids instead of text, or "
                             f"LLM(..., tokenizer=FOLDER) to borrow one")

    def _requests(self, prompts, prompt_token_ids) -> list[tuple[str | None, list[int]]]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompts and prompt_token_ids")
        if prompt_token_ids is not None:
            ids = list(prompt_token_ids)
            if ids and isinstance(ids[0], int):
                ids = [ids]
            return [(None, _token_ids(t, f"prompt_token_ids[{i}]")) for i, t in enumerate(ids)]
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and all(_is_token(t) for t in prompts)):
            prompts = [prompts]  # one prompt (a dict is never iterated: its keys are not prompts)
        elif not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a string, a list of token ids, a {{'prompt': ...}} or "
                             f"{{'prompt_token_ids': ...}} dict, or a list of these; got {type(prompts).__name__}")
        return [self._one_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]

    def _one_prompt(self, p, where: str) -> tuple[str | None, list[int]]:
        if isinstance(p, str):
            self._need_tokenizer()
            return p, self.tokenizer.encode(p)
        if isinstance(p, dict):
            unknown = sorted(set(p) - {"prompt", "prompt_token_ids"})
            if unknown:
                raise ValueError(f"{where} has unsupported key(s) {', '.join(map(repr, unknown))}: a prompt dict "
                                 f"takes 'prompt' (text) or 'prompt_token_ids'")
            if "prompt_token_ids" in p:
                text = p.get("prompt")
                if text is not None and not isinstance(text, str):
                    raise ValueError(f"{where}['prompt'] must be a string, got {text!r}")
                return text, _token_ids(p["prompt_token_ids"], f"{where}['prompt_token_ids']")
            if not isinstance(p.get("prompt"), str):
                raise ValueError(f"{where} must have 'prompt' (a string) or 'prompt_token_ids', got {p!r}")
            return self._one_prompt(p["prompt"], where)
        if isinstance(p, (list, tuple)):
            return None, _token_ids(p, where)
        raise ValueError(f"{where} must be a string, a list of token ids or a prompt dict, got {p!r}")

    def _engine_params(self, p: SamplingParams, copy: int) -> SamplingParams:
        """One engine request's settings: answer `copy` of the prompt's (see parallel_sampling)."""
        return dataclasses.replace(choice_params(p, copy), output_kind="final_only")

    def _result(self, final: dict[str, RequestOutput], rids: list[str], p: SamplingParams) -> RequestOutput:
        first = final[rids[0]]
        answers = []
        for rid in rids:
            o = final[rid].outputs[0]
            lp = None if p.logprobs is None else to_logprobs(o.logprobs, o.token_ids, p.logprobs, self._token_text)
            answers.append(dataclasses.replace(o, logprobs=lp,
                                               cumulative_logprob=cumulative_logprob(o.logprobs, o.token_ids)))
        answers = keep_best(answers, p.n)
        request_id = first.request_id if len(rids) == 1 else first.request_id.rsplit("-", 1)[0]
        prompt_logprobs = first.prompt_logprobs
        if prompt_logprobs is not None:
            for entry in prompt_logprobs[1:]:
                for t, lp in entry.items():
                    lp.decoded_token = self._token_text(t)
        return RequestOutput(request_id, first.prompt, first.prompt_token_ids, answers, finished=True,
                             prompt_logprobs=prompt_logprobs)

    def _token_text(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id], skip_special_tokens=False)


PromptInput = str | list[int] | dict[str, Any]


def _is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _token_ids(ids, where: str) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not all(_is_token(t) for t in ids):
        raise ValueError(f"{where} must be a list of token ids (integers), got {ids!r}")
    return list(ids)


def _per_request(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return params
