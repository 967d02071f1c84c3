"""POST /v1/chat/completions: messages through the checkpoint's chat template, n answers out, whole or
streamed. The answer is split (chat_output.py) into reasoning_content (the model's <think> block, unless the
reasoning parser is off), content and tool_calls (MiniMax-M1's <tool_calls> block, when the request has tools
and tool_choice is not "none"). tool_choice "required" or a named function is enforced by a grammar; so are
response_format and vLLM's guided_* / structured_outputs, which start after the <think> block when the
reasoning parser is on."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ..structured.tools import tool_choice_params
from ..tokenizer import ROLES
from .async_engine import EngineRequest
from .chat_output import ChatOutputParser, parse_chat_output
from .protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
    DeltaToolCall,
    TokenLogprob,
    ToolCall,
    TopLogprob,
)
from .serving import SSE_DONE, BadRequest, ChoiceProgress, OpenAIServing, sse

def prepare(s: OpenAIServing, req: ChatCompletionRequest) -> list[EngineRequest]:
    """Check the request, render the chat template, make the engine requests; raises BadRequest."""
    s.check_request(req, {})
    if req.top_logprobs is not None and not req.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    s.check_num_seqs(1, req.n)
    try:
        forced = tool_choice_params(req.tools, req.tool_choice, req.parallel_tool_calls)
    except ValueError as e:
        raise BadRequest(str(e), param="tool_choice") from e
    try:
        prompt = s.tokenizer.apply_chat_template(
            messages(req), add_generation_prompt=req.add_generation_prompt, tools=req.tools,
            continue_final_message=req.continue_final_message, **(req.chat_template_kwargs or {}))
    except (ValueError, TypeError) as e:
        raise BadRequest(str(e), param="messages") from e
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    structured = s.structured_outputs(req, forced, after_reasoning=s.reasoning_parser)
    params = s.sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, structured)
    return s.engine_requests(s.new_id("chatcmpl"), [(prompt, s.tokenizer.encode(prompt))], params,
                             param="messages")


def messages(req: ChatCompletionRequest) -> list[dict]:
    """The request's messages as plain dicts (OpenAI's shape: the tokenizer maps them onto the template's,
    tool calls and tool results included, and refuses an unknown role). A reasoning_content sent back is
    left out: the template does not show past reasoning."""
    out = []
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}",
                             param=f"messages[{i}].role")
        for part in m.content if isinstance(m.content, list) else []:
            if part.type != "text" or part.text is None:
                raise BadRequest(f"messages[{i}].content: only text parts are supported, got type {part.type!r}",
                                 param=f"messages[{i}].content")
        d = m.model_dump(exclude_none=True)
        d.pop("reasoning_content", None)
        out.append(d)
    return out


def parses_tools(s: OpenAIServing, req: ChatCompletionRequest) -> bool:
    """Whether tool calls are read out of the answer: a forced choice always; auto (the default with tools)
    unless --tool-call-parser none."""
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
    if not req.tools or choice == "none":
        return False
    return choice != "auto" or s.tool_parser


def _named(req: ChatCompletionRequest) -> bool:
    return isinstance(req.tool_choice, dict)


def _finish_reason(reason: str | None, calls: list, req: ChatCompletionRequest) -> str | None:
    """OpenAI's: "tool_calls" when the answer ended in calls (a named tool_choice says "stop")."""
    return "tool_calls" if calls and reason == "stop" and not _named(req) else reason


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


async def response(s: OpenAIServing, req: ChatCompletionRequest,
                   requests: list[EngineRequest]) -> ChatCompletionResponse:
    outputs = await s.collect(requests)
    tools = parses_tools(s, req)
    choices = []
    for i, (r, out) in enumerate(zip(requests, outputs)):
        o = out.outputs[0]
        reasoning, content, calls = parse_chat_output(o.text, r.prompt, s.reasoning_parser, tools)
        message = ChatResponseMessage(content=content, reasoning_content=reasoning,
                                      tool_calls=[ToolCall(**c) for c in calls])
        choices.append(ChatChoice(index=i, message=message,
                                  logprobs=_logprobs(s, o.token_ids, o.logprobs, req.top_logprobs or 0),
                                  finish_reason=_finish_reason(o.finish_reason, calls, req),
                                  stop_reason=o.stop_reason))
    return ChatCompletionResponse(id=s.response_id(requests), model=s.model_name, choices=choices,
                                  usage=s.usage(requests, sum(len(o.outputs[0].token_ids) for o in outputs), req.n),
                                  prompt_logprobs=s.prompt_logprobs(outputs[0].prompt_logprobs))


async def stream(s: OpenAIServing, req: ChatCompletionRequest, requests: list[EngineRequest]) -> AsyncIterator[str]:
    """Server-sent events: the role first, then deltas of content, reasoning_content or tool_calls (a call's
    name first, then its arguments in pieces) per choice, the finish reason with the last delta, then, with
    stream_options.include_usage, a chunk with the usage and no choices; then [DONE]."""
    base_id, created = s.response_id(requests), int(time.time())
    usage_each = req.stream_options is not None and req.stream_options.continuous_usage_stats

    def chunk(choices, usage=None) -> str:
        return sse(ChatCompletionChunk(id=base_id, created=created, model=s.model_name, choices=choices, usage=usage))

    for i in range(len(requests)):
        yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
    index = {r.request_id: i for i, r in enumerate(requests)}
    progress = [ChoiceProgress() for _ in requests]
    tools = parses_tools(s, req)
    parsers = [ChatOutputParser(r.prompt, s.reasoning_parser, tools) for r in requests]
    async for out in s.engine.generate(requests):
        i = index[out.request_id]
        _, tokens, entries = progress[i].advance(out)
        d = parsers[i].feed(progress[i].text, out.finished)
        if not (d or entries or out.finished):
            continue
        delta = DeltaMessage(content=d.content or None, reasoning_content=d.reasoning or None,
                             tool_calls=[DeltaToolCall(**c) for c in d.tool_calls] or None)
        logprobs = _logprobs(s, tokens, entries, req.top_logprobs or 0)
        o = out.outputs[0]
        finish = dict(finish_reason=_finish_reason(o.finish_reason, parsers[i].tool_calls, req),
                      stop_reason=o.stop_reason) if out.finished else {}
        usage = s.usage(requests, sum(p.tokens for p in progress), req.n) if usage_each else None
        yield chunk([ChatStreamChoice(index=i, delta=delta, logprobs=logprobs, **finish)], usage)
    if req.stream_options is not None and req.stream_options.include_usage:
        yield chunk([], usage=s.usage(requests, sum(p.tokens for p in progress), req.n))
    yield SSE_DONE
