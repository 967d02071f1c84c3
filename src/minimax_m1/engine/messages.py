"""What the API server and the engine core say to each other over ZeroMQ, as msgpack (msgspec structs).

Requests carry their SamplingParams pickled whole, so that fields added to it travel without a change
here; everything else is a compact struct (arrays, no field names on the wire). Outputs are batched:
one StepOutputs per engine-loop turn, with the tokens each request got and the engine's gauges."""
from __future__ import annotations

import pickle
from typing import Any

import msgspec

from ..outputs import Logprob


class NewRequest(msgspec.Struct, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: bytes  # pickle of the SamplingParams


class AddCall(msgspec.Struct, tag=True, array_like=True):
    """The engine requests of one client request (its prompts x n): the core admits them round-robin
    with other calls' requests."""
    requests: list[NewRequest]


class Abort(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


CoreInput = AddCall | Abort | Shutdown


class TokenOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one request got in one step: its new tokens (and logprob entries), and how it ended, if it did.
    finish_reason "error": `error` says what failed; `invalid` when the core refused the request (HTTP 400)."""
    request_id: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    invalid: bool = False
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # once, when the prompt's are computed


class Gauges(msgspec.Struct, array_like=True):
    running: int
    waiting: int  # in the scheduler's queue plus those the core holds back (round-robin admission)
    state_pool_usage: float
    kv_cache_usage: float
    prompt_tokens: int  # running totals
    generation_tokens: int
    preemptions: int


class StepOutputs(msgspec.Struct, tag=True, array_like=True):
    outputs: list[TokenOutput]
    gauges: Gauges


class CoreDead(msgspec.Struct, tag=True, array_like=True):
    """The core cannot go on (a failed device, steps failing in a row); it exits after sending this."""
    error: str


CoreOutput = StepOutputs | CoreDead


class Ready(msgspec.Struct):
    """What the core tells the server once its engine is built (the memory plan fixes max_model_len)."""
    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    summary: str = ""  # engine/report.engine_summary: dtype, device, parallel sizes, cache plan
    eos_token_ids: list[int] = []


def pack_params(params: Any) -> bytes:
    return pickle.dumps(params, protocol=pickle.HIGHEST_PROTOCOL)


def unpack_params(data: bytes) -> Any:
    return pickle.loads(data)  # noqa: S301 - from our own server process, over a private socket


encoder = msgspec.msgpack.Encoder()
input_decoder = msgspec.msgpack.Decoder(CoreInput)
output_decoder = msgspec.msgpack.Decoder(CoreOutput)
