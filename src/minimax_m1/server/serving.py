"""What the completions and chat endpoints share: request checks, sampling parameters, engine requests
(n copies of each prompt), logprob entries, usage, and server-sent events."""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import uuid

from pydantic import BaseModel

from ..outputs import RequestOutput
from ..engine.parallel_sampling import choice_params
from ..sampling_params import SamplingParams, SamplingParamsError
from ..structured import StructuredOutputsParams, UnsupportedGrammarError, from_request
from .async_engine import AsyncEngine, EngineRequest
from .protocol import ErrorInfo, ErrorResponse, SamplingFields, UsageInfo


class BadRequest(Exception):
    """A request we refuse with HTTP 400 (or `status`: 404 for an unknown model) and an OpenAI error object."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """An OpenAI error object. Text from the request (a field name) may hold what UTF-8 cannot encode (a
    lone surrogate): that is escaped."""
    message, param = _encodable(message), _encodable(param)
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code)).model_dump()


def _encodable(text: str | None) -> str | None:
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def sse(obj: BaseModel | dict) -> str:
    """One server-sent event carrying obj as JSON."""
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else ErrorResponse(**obj).model_dump_json()
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


TOKENIZER_THREADS = 4


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_names: list[str], reasoning_parser: bool = True,
                 max_num_seqs_per_request: int = 256, tool_parser: bool = True):
        self.engine = engine
        self.tool_parser = tool_parser  # read MiniMax-M1's <tool_calls> out of answers to tool_choice "auto"
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.model_names = model_names
        self.reasoning_parser = reasoning_parser
        self.max_num_seqs_per_request = max_num_seqs_per_request
        self.token_str = functools.lru_cache(maxsize=1 << 16)(self._token_str)
        # parsing, chat templates and tokenisation run here, off the event loop (a 10 MB prompt takes
        # seconds to tokenise; the tokenizer releases the GIL for long texts)
        self.executor = concurrent.futures.ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="minimax-m1-prep")

    async def run_blocking(self, fn, *args):
        """fn(*args) on the preparation threads."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    @staticmethod
    def response_id(requests: list[EngineRequest]) -> str:
        """The id of the response: its engine requests' ids less their choice index."""
        return requests[0].request_id.rsplit("-", 1)[0]

    # ---- checks and parameters ------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise BadRequest(f"the model {model!r} does not exist: this server serves {self.model_name!r} "
                             f"(see /v1/models)", param="model", code="model_not_found", status=404)

    def check_request(self, req: SamplingFields, unsupported: dict[str, object]) -> None:
        """unsupported: field name -> the value the request gives it, None where the field is unused."""
        self.check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise BadRequest("stream_options is only allowed when stream is true", param="stream_options")
        for name, value in unsupported.items():
            if value is not None:
                raise BadRequest(f"{name}={value!r} is not supported by this server", param=name)

    def check_num_seqs(self, num_prompts: int, n: int) -> None:
        """prompts x n is what one request asks the engine to run: bounded by --max-num-seqs-per-request."""
        if num_prompts * n > self.max_num_seqs_per_request:
            raise BadRequest(f"this request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} sequences; "
                             f"this server runs at most {self.max_num_seqs_per_request} per request "
                             f"(--max-num-seqs-per-request): send fewer prompts or a smaller n",
                             param="n" if num_prompts == 1 else "prompt")

    def structured_outputs(self, req: SamplingFields, forced: StructuredOutputsParams | None = None,
                           after_reasoning: bool = False) -> StructuredOutputsParams | None:
        """The request's output constraint (response_format, structured_outputs, guided_*; or `forced`, a
        tool_choice grammar), compiled here so that an unsupported one is a 400 saying what (the engine
        reuses the compiled grammar). after_reasoning: the constraint starts after the <think> block."""
        fields = dict(response_format=req.response_format, structured_outputs=req.structured_outputs,
                      guided_json=req.guided_json, guided_regex=req.guided_regex, guided_choice=req.guided_choice,
                      guided_grammar=req.guided_grammar)
        given = [k for k, v in fields.items() if v is not None and not (k == "response_format"
                                                                         and v.get("type") == "text")]
        try:
            params = from_request(**fields)
        except ValueError as e:
            raise BadRequest(str(e), param=given[0] if given else None) from e
        if forced is not None:
            if params is not None:
                raise BadRequest(f"tool_choice {req.tool_choice!r} forces a tool call; it cannot be combined "
                                 f"with {given[0]}", param=given[0])
            params, given = forced, ["tool_choice"]
        else:
            if params is not None and after_reasoning:
                params = dataclasses.replace(params, after_reasoning=True)
            if params is not None and req.guided_whitespace_pattern is not None:
                try:
                    params = dataclasses.replace(params, whitespace_pattern=req.guided_whitespace_pattern)
                except ValueError as e:
                    raise BadRequest(str(e), param="guided_whitespace_pattern") from e
        if params is not None:
            try:
                self.engine.engine.grammar_compiler.compile(params)
            except UnsupportedGrammarError as e:
                raise BadRequest(str(e), param=given[0], code="unsupported_constraint") from e
            except ValueError as e:
                raise BadRequest(str(e), param=given[0]) from e
        return params

    def sampling_params(self, req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                        structured: StructuredOutputsParams | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        def pick(value, default):
            return default if value is None else value

        try:
            params = SamplingParams(
                max_tokens=max_tokens, temperature=pick(req.temperature, 1.0), top_p=pick(req.top_p, 1.0),
                top_k=pick(req.top_k, 0), min_p=pick(req.min_p, 0.0), seed=req.seed, stop=req.stop,
                stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
                repetition_penalty=pick(req.repetition_penalty, 1.0),
                presence_penalty=pick(req.presence_penalty, 0.0), frequency_penalty=pick(req.frequency_penalty, 0.0),
                logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output, min_tokens=req.min_tokens,
                logit_bias=req.logit_bias or None, bad_words=req.bad_words or None,
                prompt_logprobs=pick(prompt_logprobs, req.prompt_logprobs), structured_outputs=structured,
                n=req.n, best_of=getattr(req, "best_of", None),
                output_kind="delta" if req.stream else "final_only")
            params.check_vocab(self.engine.engine.vocab_size)
            return params
        except SamplingParamsError as e:
            raise BadRequest(str(e), param=e.param) from e

    def engine_requests(self, base_id: str, prompts: list[tuple[str | None, list[int]]], params: SamplingParams,
                        param: str) -> list[EngineRequest]:
        """params.num_samples copies of each prompt (engine request index = prompt index * copies + copy); the
        copies sample independently, with a seed copy i uses seed + i (parallel_sampling.choice_params)."""
        for _, ids in prompts:
            try:
                self.engine.engine.validate_prompt(ids)
            except ValueError as e:
                code = "context_length_exceeded" if len(ids) >= self.max_model_len else None
                raise BadRequest(str(e), param=param, code=code) from e
            if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
                raise BadRequest(
                    f"this model's maximum context length is {self.max_model_len} tokens, but {len(ids)} prompt "
                    f"tokens and max_tokens {params.max_tokens} ask for {len(ids) + params.max_tokens}: shorten "
                    f"the prompt or lower max_tokens", param="max_tokens", code="context_length_exceeded")
        requests, n = [], params.num_samples
        for p, (text, ids) in enumerate(prompts):
            for i in range(n):
                requests.append(EngineRequest(f"{base_id}-{p * n + i}", ids, choice_params(params, i), text))
        return requests

    async def collect(self, requests: list[EngineRequest]) -> list[RequestOutput]:
        """Run the requests to their end; their final outputs, in the order of `requests`."""
        final = {}
        async for out in self.engine.generate(requests):
            if out.finished:
                final[out.request_id] = out
        return [final[r.request_id] for r in requests]

    # ---- outputs --------------------------------------------------------------------------------

    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def top_logprobs(self, entry: dict[int, float], k: int | None = None) -> list[tuple[str, float]]:
        """(token text, logprob) of an engine logprob entry, best first; the first k when k is given.
        -inf (a filtered token) becomes -9999 as in vLLM: JSON has no infinity."""
        items = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
        return [(self.token_str(t), max(lp, -9999.0)) for t, lp in items]

    def prompt_logprobs(self, entries) -> list | None:
        """The engine's prompt logprobs ({id: Logprob} per token) as vLLM's API sends them."""
        if entries is None:
            return None
        return [None if e is None else {str(t): {"logprob": max(lp.logprob, -9999.0), "rank": lp.rank,
                                                 "decoded_token": self.token_str(t)} for t, lp in e.items()}
                for e in entries]

    def usage(self, requests: list[EngineRequest], completion: int, n: int) -> UsageInfo:
        """Prompt tokens count once per prompt (not per copy), as OpenAI counts them."""
        prompt = sum(len(r.prompt_token_ids) for r in requests[::n])
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


@dataclasses.dataclass
class ChoiceProgress:
    """One choice of a stream: the engine sends deltas ("delta" output kind); this keeps the totals."""
    text: str = ""  # all the output text so far
    tokens: int = 0
    finished: bool = False

    def advance(self, out: RequestOutput) -> tuple[str, list[int], list[dict] | None]:
        """The new text, token ids and logprob entries this output brings."""
        o = out.outputs[0]
        self.text += o.text
        self.tokens += len(o.token_ids)
        self.finished = out.finished
        return o.text, o.token_ids, o.logprobs
