"""POST /v1/completions: a prompt (text, token ids, or a list of either) in, n completions per prompt out,
whole or streamed."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ..outputs import RequestOutput
from .async_engine import EngineRequest
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from .serving import SSE_DONE, BadRequest, ChoiceProgress, OpenAIServing, sse


def prepare(s: OpenAIServing, req: CompletionRequest) -> list[EngineRequest]:
    """Check the request and make its engine requests; raises BadRequest."""
    s.check_request(req, {"echo": req.echo or None, "suffix": req.suffix,
                          "best_of": req.best_of if req.best_of not in (None, req.n) else None})
    params = s.sampling_params(req, req.max_tokens, req.logprobs)
    return s.engine_requests(s.new_id("cmpl"), _prompts(s, req.prompt, req.n), params, req.n, param="prompt")


def _prompts(s: OpenAIServing, prompt, n: int) -> list[tuple[str | None, list[int]]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise BadRequest("prompt is empty: give a string, a list of strings, or token ids", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    s.check_num_seqs(len(prompt), n)  # before tokenising them all
    return [(p, s.tokenizer.encode(p)) if isinstance(p, str) else (None, list(p)) for p in prompt]


def _choice(s: OpenAIServing, index: int, text: str, out: RequestOutput, tokens: list[int], logprobs,
            offset: int) -> CompletionChoice:
    o = out.outputs[0]
    return CompletionChoice(index=index, text=text, logprobs=_logprobs(s, tokens, logprobs, offset),
                            finish_reason=o.finish_reason if out.finished else None,
                            stop_reason=o.stop_reason if out.finished else None)


def _logprobs(s: OpenAIServing, tokens: list[int], entries: list[dict] | None, offset: int):
    """OpenAI's legacy logprobs: per token its text, logprob, top alternatives and character offset."""
    if entries is None:
        return None
    lp = CompletionLogprobs()
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
    return lp


async def response(s: OpenAIServing, req: CompletionRequest, requests: list[EngineRequest]) -> CompletionResponse:
    outputs = await s.collect(requests)
    choices = [_choice(s, i, o.outputs[0].text, o, o.outputs[0].token_ids, o.outputs[0].logprobs, 0)
               for i, o in enumerate(outputs)]
    return CompletionResponse(id=s.response_id(requests), model=s.model_name, choices=choices,
                              usage=s.usage(requests, sum(len(o.outputs[0].token_ids) for o in outputs), req.n))


async def stream(s: OpenAIServing, req: CompletionRequest, requests: list[EngineRequest]) -> AsyncIterator[str]:
    """Server-sent events: a chunk per new piece of any choice, then one with the usage, then [DONE]."""
    base_id, created = s.response_id(requests), int(time.time())
    index = {r.request_id: i for i, r in enumerate(requests)}
    progress = [ChoiceProgress() for _ in requests]
    offsets = [0] * len(requests)
    async for out in s.engine.generate(requests):
        i = index[out.request_id]
        text, tokens, logprobs = progress[i].advance(out)
        if not (text or logprobs or out.finished):
            continue
        choice = _choice(s, i, text, out, tokens, logprobs, offsets[i])
        offsets[i] += sum(map(len, choice.logprobs.tokens)) if choice.logprobs else 0
        yield sse(CompletionResponse(id=base_id, created=created, model=s.model_name, choices=[choice]))
    usage = s.usage(requests, sum(p.tokens for p in progress), req.n)
    yield sse(CompletionResponse(id=base_id, created=created, model=s.model_name, choices=[], usage=usage))
    yield SSE_DONE
