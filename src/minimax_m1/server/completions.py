"""POST /v1/completions: a prompt (text, token ids, or a list of either) in, n completions per prompt out,
whole or streamed. Scoring as eval harnesses do it: echo puts the prompt before the completion, and with
logprobs the prompt tokens' logprobs come first (the first token's None: nothing predicts it); max_tokens 0
with echo returns the prompt alone. best_of samples more answers and keeps the n most likely."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from ..engine.parallel_sampling import keep_best
from ..outputs import CompletionOutput, RequestOutput, cumulative_logprob
from .async_engine import EngineRequest
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from .serving import SSE_DONE, BadRequest, ChoiceProgress, OpenAIServing, sse


def prepare(s: OpenAIServing, req: CompletionRequest) -> list[EngineRequest]:
    """Check the request and make its engine requests; raises BadRequest."""
    s.check_request(req, {"suffix": req.suffix})
    if req.best_of is not None and req.best_of < req.n:
        raise BadRequest(f"best_of ({req.best_of}) must be at least n ({req.n})", param="best_of")
    if req.stream and req.best_of not in (None, req.n):
        raise BadRequest("best_of > n cannot be streamed (the answers are ranked once they are complete)",
                         param="best_of")
    prompts = _prompts(s, req.prompt, req.best_of or req.n)
    # echo with logprobs scores the prompt: its logprobs, with the same number of alternatives
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    if req.prompt_logprobs is not None:
        prompt_logprobs = max(prompt_logprobs or 0, req.prompt_logprobs)
    params = s.sampling_params(req, req.max_tokens, req.logprobs, s.structured_outputs(req), prompt_logprobs)
    requests = s.engine_requests(s.new_id("cmpl"), prompts, params, param="prompt")
    if req.stream and req.echo and prompt_logprobs is not None:  # each streamed copy echoes the prompt's
        for r in requests:
            r.params = dataclasses.replace(r.params, prompt_logprobs=prompt_logprobs)
    return requests


def _prompts(s: OpenAIServing, prompt, copies: int) -> list[tuple[str | None, list[int]]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise BadRequest("prompt is empty: give a string, a list of strings, or token ids", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    s.check_num_seqs(len(prompt), copies)  # before tokenising them all
    return [(p, s.tokenizer.encode(p)) if isinstance(p, str) else (None, list(p)) for p in prompt]


def _copies(req: CompletionRequest) -> int:
    return req.best_of or req.n


class _Echo:
    """What echo puts before a choice's first piece: the prompt's text and, with logprobs, its tokens'."""

    def __init__(self, s: OpenAIServing, req: CompletionRequest, r: EngineRequest):
        self.s, self.req, self.r = s, req, r
        self.pending = req.echo

    def text(self) -> str:
        r = self.r
        return r.prompt if r.prompt is not None else self.s.tokenizer.decode(r.prompt_token_ids,
                                                                             skip_special_tokens=False)

    def logprobs(self, out: RequestOutput, lp: CompletionLogprobs) -> None:
        """The prompt tokens' entries into lp (from the engine's prompt logprobs)."""
        entries = out.prompt_logprobs or [None] * len(self.r.prompt_token_ids)
        offset = 0
        for i, (token, entry) in enumerate(zip(self.r.prompt_token_ids, entries)):
            text = self.s.token_str(token)
            lp.tokens.append(text)
            lp.text_offset.append(offset)
            offset += len(text)
            if entry is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            lp.token_logprobs.append(max(entry[token].logprob, -9999.0))
            ranked = sorted(entry.items(), key=lambda kv: (kv[1].rank or 1 << 30, -kv[1].logprob))
            top: dict[str, float] = {}
            for t, v in ranked[:self.req.logprobs] if self.req.logprobs else []:
                top.setdefault(self.s.token_str(t), max(v.logprob, -9999.0))
            top.setdefault(text, lp.token_logprobs[-1])  # vLLM's: the prompt token is among its own top
            lp.top_logprobs.append(top)


def _choice(s: OpenAIServing, req: CompletionRequest, index: int, text: str, out: RequestOutput,
            o: CompletionOutput, tokens: list[int], logprobs, offset: int, echo: _Echo | None) -> CompletionChoice:
    lp = None
    if req.logprobs is not None:
        lp = CompletionLogprobs()
        if echo is not None and echo.pending:
            echo.logprobs(out, lp)
            offset = len(echo.text())
        _logprobs(s, tokens, logprobs, offset, lp)
    if echo is not None and echo.pending:
        text, echo.pending = echo.text() + text, False
    return CompletionChoice(index=index, text=text, logprobs=lp,
                            finish_reason=o.finish_reason if out.finished else None,
                            stop_reason=o.stop_reason if out.finished else None,
                            prompt_logprobs=s.prompt_logprobs(out.prompt_logprobs)
                            if req.prompt_logprobs is not None else None)


def _logprobs(s: OpenAIServing, tokens: list[int], entries: list[dict] | None, offset: int,
              lp: CompletionLogprobs) -> None:
    """OpenAI's legacy logprobs: per token its text, logprob, top alternatives and character offset."""
    if entries is None:
        return
    for token, entry in zip(tokens, entries):
        text = s.token_str(token)
        lp.tokens.append(text)
        lp.token_logprobs.append(max(entry[token], -9999.0))
        top: dict[str, float] = {}
        for alt, alt_lp in s.top_logprobs(entry):  # best first: where two tokens read the same, the better one
            top.setdefault(alt, alt_lp)
        lp.top_logprobs.append(top)
        lp.text_offset.append(offset)
        offset += len(text)


async def response(s: OpenAIServing, req: CompletionRequest, requests: list[EngineRequest]) -> CompletionResponse:
    outputs = await s.collect(requests)
    copies, choices = _copies(req), []
    for p in range(0, len(requests), copies):
        group = outputs[p:p + copies]
        answers = [(o, o.outputs[0]) for o in group]
        if copies > req.n:  # best_of: the n most likely, by the sampled tokens' logprobs
            scored = [CompletionOutput(i, "", a.token_ids, cumulative_logprob=cumulative_logprob(a.logprobs,
                                                                                                  a.token_ids))
                      for i, (_, a) in enumerate(answers)]
            answers = [answers[c.index] for c in keep_best(scored, req.n)]
        for out, o in answers:
            echo = _Echo(s, req, requests[p]) if req.echo else None
            first = group[0]  # prompt logprobs come with the prompt's first copy
            out = RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, out.outputs, out.finished,
                                prompt_logprobs=first.prompt_logprobs)
            choices.append(_choice(s, req, len(choices), o.text, out, o, o.token_ids,
                                   o.logprobs if req.logprobs is not None else None, 0, echo))
    return CompletionResponse(id=s.response_id(requests), model=s.model_name, choices=choices,
                              usage=s.usage(requests, sum(len(o.outputs[0].token_ids) for o in outputs), copies))


async def stream(s: OpenAIServing, req: CompletionRequest, requests: list[EngineRequest]) -> AsyncIterator[str]:
    """Server-sent events: a chunk per new piece of any choice (with echo, the prompt leads each choice's
    first), then, with stream_options.include_usage, one with the usage and no choices; then [DONE]."""
    base_id, created = s.response_id(requests), int(time.time())
    index = {r.request_id: i for i, r in enumerate(requests)}
    progress = [ChoiceProgress() for _ in requests]
    offsets = [0] * len(requests)
    echoes = [_Echo(s, req, r) if req.echo else None for r in requests]
    usage_each = req.stream_options is not None and req.stream_options.continuous_usage_stats
    async for out in s.engine.generate(requests):
        i = index[out.request_id]
        text, tokens, logprobs = progress[i].advance(out)
        if not (text or logprobs or out.finished or (echoes[i] and echoes[i].pending)):
            continue
        choice = _choice(s, req, i, text, out, out.outputs[0], tokens, logprobs, offsets[i], echoes[i])
        if choice.logprobs:
            offsets[i] = choice.logprobs.text_offset[-1] + len(choice.logprobs.tokens[-1]) \
                if choice.logprobs.tokens else offsets[i]
        usage = s.usage(requests, sum(p.tokens for p in progress), req.n) if usage_each else None
        yield sse(CompletionResponse(id=base_id, created=created, model=s.model_name, choices=[choice], usage=usage))
    if req.stream_options is not None and req.stream_options.include_usage:
        usage = s.usage(requests, sum(p.tokens for p in progress), req.n)
        yield sse(CompletionResponse(id=base_id, created=created, model=s.model_name, choices=[], usage=usage))
    yield SSE_DONE
