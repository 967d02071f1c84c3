"""A request's generated text as its client sees it: stop strings, the held-back tail that might start one, and
the CompletionOutput of each step in the params' output_kind. One place for the in-process engine
(LLMEngine._append) and the server beside an engine-core process (server/async_engine.py), so that both give
the same outputs."""
from __future__ import annotations

from ..outputs import CompletionOutput
from ..sampling_params import SamplingParams


def find_stop(text: str, stops: list[str], emitted: int):
    """The earliest stop string in text that ends after the already-emitted part; (stop, index) or None."""
    best = None
    for stop in stops:
        at = text.find(stop, max(0, emitted - len(stop) + 1))
        if at >= 0 and (best is None or at < best[1]):
            best = (stop, at)
    return best


def cut_at_stop(text: str, emitted: str, p: SamplingParams) -> tuple[str, str | None]:
    """text (the whole output so far; `emitted` the part already final) cut at its first new stop string ->
    (text, that stop string), or (text, None) when none ends in it."""
    hit = find_stop(text, p.stop, len(emitted))
    if hit is None:
        return text, None
    stop, at = hit
    return (text[: at + len(stop)] if p.include_stop_str_in_output else text[:at]), stop


def hold_back(text: str, emitted: str, p: SamplingParams) -> str:
    """A running request's text without the tail that may yet start a stop string, so streamed text never
    needs retracting."""
    if not p.stop:
        return text
    return text[: max(len(emitted), len(text) - max(map(len, p.stop)) + 1)]


def completion_output(state, token_ids: list[int]) -> CompletionOutput | None:
    """This step's CompletionOutput of a request in its params' output_kind (None: a final_only request still
    running). state: the request's text, logprobs, finished, finish_reason, stop_reason and sent_tokens /
    sent_chars (how much delta outputs have carried, advanced here); token_ids its generated tokens."""
    kind = state.params.output_kind
    if kind == "final_only" and not state.finished:
        return None
    start, chars = (state.sent_tokens, state.sent_chars) if kind == "delta" else (0, 0)
    state.sent_tokens, state.sent_chars = len(token_ids), len(state.text)
    return CompletionOutput(index=0, text=state.text[chars:], token_ids=token_ids[start:],
                            finish_reason=state.finish_reason, stop_reason=state.stop_reason,
                            logprobs=state.logprobs[start:] if state.logprobs is not None else None)
