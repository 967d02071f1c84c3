"""POST /v1/chat/completions: messages through the checkpoint's chat template, n answers out, whole or
streamed, the model's <think> block split off as `reasoning_content` unless the parser is turned off."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ..outputs import RequestOutput
from .async_engine import EngineRequest
from .protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
)
from .reasoning import ReasoningParser, split_reasoning
from .serving import SSE_DONE, BadRequest, ChoiceProgress, OpenAIServing, sse

ROLES = ("system", "user", "assistant", "tool")


def prepare(s: OpenAIServing, req: ChatCompletionRequest) -> list[EngineRequest]:
    """Check the request, render the chat template, make the engine requests; raises BadRequest."""
    fmt = (req.response_format or {}).get("type", "text")
    s.check_request(req, {"response_format": req.response_format if fmt != "text" else None,
                          "tool_choice": req.tool_choice if req.tool_choice not in (None, "none", "auto") else None})
    if req.top_logprobs is not None and not req.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    s.check_num_seqs(1, req.n)
    try:
        prompt = s.tokenizer.apply_chat_template(_messages(req), add_generation_prompt=req.add_generation_prompt,
                                                 tools=req.tools)
    except ValueError as e:
        raise BadRequest(str(e), param="messages") from e
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = s.sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
    return s.engine_requests(s.new_id("chatcmpl"), [(prompt, s.tokenizer.encode(prompt))], params, req.n,
                             param="messages")


def _messages(req: ChatCompletionRequest) -> list[dict]:
    """OpenAI messages as the template reads them: content one string (text parts joined by newlines),
    'developer' as 'system'."""
    messages = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)} or developer, got {m.role!r}",
                             param=f"messages[{i}].role")
        content = m.content
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise BadRequest(f"messages[{i}].content: only text parts are supported, got type {part.type!r}",
                                     param=f"messages[{i}].content")
            content = "\n".join(part.text for part in content)
        extra = {k: v for k, v in (m.model_extra or {}).items() if k != "reasoning_content"}
        messages.append({**extra, "role": role, "content": content or "", **({"name": m.name} if m.name else {})})
    return messages


def _logprobs(s: OpenAIServing, tokens: list[int], entries: list[dict] | None, k: int) -> ChatLogprobs | None:
    if entries is None:
        return None

    def top(text, lp):
        return TopLogprob(token=text, logprob=lp, bytes=list(text.encode()))

    content = []
    for token, entry in zip(tokens, entries):
        text = s.token_str(token)
        content.append(TokenLogprob(token=text, logprob=max(entry[token], -9999.0), bytes=list(text.encode()),
                                    top_logprobs=[top(t, lp) for t, lp in s.top_logprobs(entry, k)]))
    return ChatLogprobs(content=content)


def _finish(out: RequestOutput) -> dict:
    o = out.outputs[0]
    return dict(finish_reason=o.finish_reason, stop_reason=o.stop_reason) if out.finished else {}


async def response(s: OpenAIServing, req: ChatCompletionRequest,
                   requests: list[EngineRequest]) -> ChatCompletionResponse:
    outputs = await s.collect(requests)
    choices = []
    for i, (r, out) in enumerate(zip(requests, outputs)):
        o = out.outputs[0]
        reasoning, content = split_reasoning(o.text, r.prompt) if s.reasoning_parser else (None, o.text)
        choices.append(ChatChoice(index=i, message=ChatResponseMessage(content=content, reasoning_content=reasoning),
                                  logprobs=_logprobs(s, o.token_ids, o.logprobs, req.top_logprobs or 0),
                                  **_finish(out)))
    return ChatCompletionResponse(id=s.response_id(requests), model=s.model_name, choices=choices,
                                  usage=s.usage(requests, sum(len(o.outputs[0].token_ids) for o in outputs), req.n))


async def stream(s: OpenAIServing, req: ChatCompletionRequest, requests: list[EngineRequest]) -> AsyncIterator[str]:
    """Server-sent events: the role first, then deltas of content or reasoning_content per choice, the
    finish reason with the last delta, a final chunk with the usage, and [DONE]."""
    base_id, created = s.response_id(requests), int(time.time())

    def chunk(choices, usage=None) -> str:
        return sse(ChatCompletionChunk(id=base_id, created=created, model=s.model_name, choices=choices, usage=usage))

    for i in range(len(requests)):
        yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
    index = {r.request_id: i for i, r in enumerate(requests)}
    progress = [ChoiceProgress() for _ in requests]
    parsers = [ReasoningParser(r.prompt) if s.reasoning_parser else None for r in requests]
    async for out in s.engine.generate(requests):
        i = index[out.request_id]
        text, tokens, entries = progress[i].advance(out)
        reasoning, content = parsers[i].feed(progress[i].text, out.finished) if parsers[i] else ("", text)
        if not (reasoning or content or entries or out.finished):
            continue
        delta = DeltaMessage(content=content or None, reasoning_content=reasoning or None)
        logprobs = _logprobs(s, tokens, entries, req.top_logprobs or 0)
        yield chunk([ChatStreamChoice(index=i, delta=delta, logprobs=logprobs, **_finish(out))])
    yield chunk([], usage=s.usage(requests, sum(p.tokens for p in progress), req.n))
    yield SSE_DONE
