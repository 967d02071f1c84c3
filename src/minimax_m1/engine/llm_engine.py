"""The engine loop: schedule, run the model, sample, detokenize, stop.

Faults stay with the requests they touch: an error in one request's sampling or detokenising finishes that
request with finish_reason "error" (the others go on); an error in a model step (an out-of-memory, a bug)
preempts the step's requests to be recomputed once, and fails them if it happens again. Only a failed
device raises out of step() (EngineFatalError)."""
from __future__ import annotations

import logging
import threading
import weakref

import torch

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from ..host_tensors import from_list
from . import prompt_logprobs
from .async_decode import InFlight, samples_on_device
from .constraints import RequestConstraints
from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner
from .scheduler import ScheduledChunk, Scheduler
from .sequence import Sequence, Status
from .text_output import completion_output, cut_at_stop, hold_back

logger = logging.getLogger(__name__)


class EngineFatalError(RuntimeError):
    """The engine cannot go on (the device failed); every request is lost."""


class LLMEngine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer, eos_token_ids: list[int],
                 vocab_size: int, max_model_len: int, async_scheduling: bool = False):
        self.runner, self.scheduler, self.tokenizer = runner, scheduler, tokenizer
        self.cache = scheduler.cache  # the one cache manager: the scheduler allocates, metrics read usage
        self.eos_token_ids = set(eos_token_ids)
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self.requests: dict[str, Sequence] = {}
        self.num_generated_tokens = 0  # running totals, for metrics
        self.num_prompt_tokens = 0
        self._retried: weakref.WeakSet[Sequence] = weakref.WeakSet()  # preempted once after a failed step
        self._grammar_compiler = None
        self._grammar_lock = threading.Lock()
        self.async_scheduling = async_scheduling  # engine/async_decode.py; one device only
        self._in_flight: InFlight | None = None  # a launched decode step whose tokens the next step() reads
        self.num_async_steps = 0  # decode steps whose tokens stayed on the device for the next one

    @property
    def grammar_compiler(self):
        """Structured outputs' compiler for this tokenizer and vocabulary, built on first use (it reads the
        whole tokenizer). Thread-safe: a front end may compile a request's grammar ahead of the engine (to
        refuse an unsupported one early); the compiled grammar is cached for the engine to reuse."""
        with self._grammar_lock:
            if self._grammar_compiler is None:
                from ..structured import GrammarCompiler  # llguidance loads only when used

                if self.tokenizer is None:
                    raise ValueError("structured outputs need a tokenizer (this model has no tokenizer.json)")
                self._grammar_compiler = GrammarCompiler(self.tokenizer, self.vocab_size, sorted(self.eos_token_ids))
            return self._grammar_compiler

    # ---- requests -----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, detokenize: bool = True) -> Sequence:
        """detokenize False: outputs carry tokens and no text, and so no stop string ever matches (the engine
        core: the server detokenises and checks stop strings)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate_prompt(prompt_token_ids)
        params.check_vocab(self.vocab_size)
        # a seed gives the same tokens whatever else runs in the batch: a generator of its own
        generator = None if params.seed is None else torch.Generator(self.runner.device).manual_seed(params.seed)
        constraints = RequestConstraints.create(params, prompt_token_ids, compiler=lambda: self.grammar_compiler,
                                                tokenizer=self.tokenizer, eos_token_ids=self.eos_token_ids)
        detokenizer = IncrementalDetokenizer(self.tokenizer if detokenize else None, prompt_token_ids,
                                             params.skip_special_tokens)
        seq = Sequence(request_id, prompt_token_ids, params, prompt=prompt, detokenizer=detokenizer,
                       generator=generator)
        seq.constraints = constraints
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        self.num_prompt_tokens += len(prompt_token_ids)
        return seq

    def validate_prompt(self, ids: list[int]) -> None:
        check_prompt(ids, self.max_model_len, self.vocab_size)

    def abort_request(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.finished:
            self.scheduler.finish(seq, "abort")

    def finish_request(self, request_id: str, reason: str, stop_reason=None) -> RequestOutput | None:
        """End a request early (a time limit) with `reason`; its final output, None if it is not running."""
        seq = self.requests.pop(request_id, None)
        if seq is None or seq.finished:
            return None
        seq.stop_reason = stop_reason
        self.scheduler.finish(seq, reason)
        return self._output(seq)

    def shutdown(self) -> None:
        """Stop the other ranks of a parallel engine (nothing to do on one device)."""
        self.runner.shutdown()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one model step; return an output for every request that got a token or finished. Under async
        scheduling a decode step's tokens come out of the next call, which first launches the step after it."""
        if self._in_flight is not None:
            if any(not s.finished for s in self._in_flight.seqs):
                return self._step_in_flight()
            self._in_flight = None  # every row finished or was aborted: nothing to read
        chunks = self.scheduler.schedule()
        finished_early = [s for s in self.requests.values() if s.finished]  # by the scheduler (too long)
        if not chunks:
            return [self._pop_finished(s) for s in finished_early]
        done = [c.seq for c in chunks if c.completes]  # before run() advances num_computed
        try:
            logits = prompt_logprobs.run_step(self.runner, chunks)
        except EngineFatalError:  # a parallel rank failed: no retry can bring the ranks back in step
            raise
        except Exception as e:  # noqa: BLE001 - out of memory or a bug: the step's requests, not the engine
            return self._step_failed(chunks, e) + [self._pop_finished(s) for s in finished_early]
        outputs = []
        if any(s.params.max_tokens == 0 for s in done):  # scoring only: the prompt ran, nothing to sample
            keep = [i for i, s in enumerate(done) if s.params.max_tokens != 0]
            for s in done:
                if s.params.max_tokens == 0:
                    self.scheduler.finish(s, "length")
                    outputs.append(self._output(s))
            logits, done = logits[keep], [done[i] for i in keep]
        if done and self._goes_async(chunks, done):
            try:
                self._in_flight = InFlight.start(done, self.runner.sample_on_device(logits, done))
                done = []
                self.num_async_steps += 1
            except Exception:  # noqa: BLE001 - sampled again below, where a failing row fails alone
                logger.debug("device-side sampling failed; sampling on the host path", exc_info=True)
        if done:
            self._deliver(self._sample(logits, done, outputs), outputs)
        for seq in finished_early:
            outputs.append(self._pop_finished(seq))
        self._forget_finished([c.seq for c in chunks])
        return [o for o in outputs if o is not None]

    def _deliver(self, sampled, outputs: list) -> None:
        """Each (seq, token, logprobs) appended to its request, and the request's output into `outputs`."""
        for seq, tok, lp in sampled:
            try:
                self._append(seq, tok, lp)
            except Exception as e:  # noqa: BLE001 - detokenising or stop checks: this request only
                outputs.append(self._fail(seq, e))
                continue
            outputs.append(self._output(seq))

    def _forget_finished(self, seqs: list[Sequence]) -> None:
        """Drop the finished ones of seqs from the requests (not a newer request that reuses the id)."""
        for seq in seqs:
            if seq.finished and self.requests.get(seq.request_id) is seq:
                del self.requests[seq.request_id]

    # ---- async scheduling (engine/async_decode.py) ---------------------------------------------

    def _goes_async(self, chunks: list[ScheduledChunk], done: list[Sequence]) -> bool:
        """This step's tokens may stay on the device: a decode of every running sequence, none that could join."""
        return (self.async_scheduling and self.runner.peers is None and len(done) == len(chunks)
                and all(c.num_tokens == 1 for c in chunks) and self._all_that_runs(done)
                and all(samples_on_device(s) for s in done))

    def _all_that_runs(self, seqs: list[Sequence]) -> bool:
        """seqs are every running sequence, and no waiting request could join them in the next step."""
        return len(seqs) == len(self.scheduler.running) and not self.scheduler.can_admit()

    def _step_in_flight(self) -> list[RequestOutput]:
        """Launch the decode step after the one in flight (when it is what the scheduler would run), then read
        the in-flight step's tokens and give their outputs."""
        inf, self._in_flight = self._in_flight, None
        live = [s for s in inf.seqs if not s.finished]
        outputs = []
        if self._all_that_runs(live) and all(s.status == Status.RUNNING and s.num_computed == s.num_tokens
                                             for s in live):
            self._in_flight = self._launch_after(inf, outputs)
        following = self._in_flight is not None
        try:
            tokens = inf.wait()
        except Exception as e:  # an error of a step that already ran: the device itself
            raise EngineFatalError(f"the device failed: {type(e).__name__}: {e}") from e
        # rows finished before this step ran (or aborted meanwhile) are void
        sampled = [(seq, tok, None) for seq, tok in zip(inf.seqs, tokens) if not seq.finished]
        if following:
            for seq, _, _ in sampled:
                seq.token_ids.pop()  # the placeholder that stood for tok in the step just launched
        self._deliver(sampled, outputs)
        self._forget_finished([seq for seq, _, _ in sampled])
        return [o for o in outputs if o is not None]

    def _launch_after(self, inf: InFlight, outputs: list) -> InFlight | None:
        """One more decode step for inf's live sequences, its input tokens inf's (still on the device). None
        when a sequence needs a KV block that is not free (the scheduler then decides, and may preempt), or
        when the step failed: handled as any failed step (_step_failed: a device error is fatal; each request
        is recomputed once and fails the second time, its output into `outputs`)."""
        rows = sorted((i for i, s in enumerate(inf.seqs) if not s.finished), key=lambda i: inf.seqs[i].arrival)
        seqs = [inf.seqs[i] for i in rows]
        if not all(self.cache.grow(s, s.num_tokens + 1) for s in seqs):
            return None
        ids = inf.tokens
        if rows != list(range(len(inf.seqs))):
            ids = ids[from_list(rows, torch.int64, pin=ids.is_cuda).to(ids.device, non_blocking=True)]
        for s in seqs:
            s.token_ids.append(0)  # stands for the token in flight: the device feeds the real one
        try:
            logits = self.runner.run([ScheduledChunk(s, 1) for s in seqs], device_ids=ids)
            inf = InFlight.start(seqs, self.runner.sample_on_device(logits, seqs))
            self.num_async_steps += 1
            return inf
        except EngineFatalError:
            raise
        except Exception as e:  # noqa: BLE001 - out of memory or a bug: these requests, not the engine
            for s in seqs:
                s.token_ids.pop()
            outputs += self._step_failed([ScheduledChunk(s, 1) for s in seqs], e)
            return None

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], outputs: list):
        """(seq, token, logprobs) for each seq whose sampling worked. When the batch fails, each row is
        sampled alone and a row that fails again finishes its request (its failure output goes to outputs)."""
        try:
            tokens, logprobs = self.runner.sample(logits, seqs)
            return list(zip(seqs, tokens, logprobs))
        except Exception:  # noqa: BLE001 - find the row that fails
            pass
        sampled = []
        for i, seq in enumerate(seqs):
            try:
                (tok,), (lp,) = self.runner.sample(logits[i:i + 1], [seq])
            except Exception as e:  # noqa: BLE001
                outputs.append(self._fail(seq, e))
                continue
            sampled.append((seq, tok, lp))
        return sampled

    def _step_failed(self, chunks: list[ScheduledChunk], error: Exception) -> list[RequestOutput]:
        """The model step raised: its caches may hold half-written state, so each of its requests is
        preempted (recomputed from scratch) once, and finished with an error the second time."""
        device = self.runner.device
        if device.type == "cuda":
            if isinstance(error, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
            try:
                torch.cuda.synchronize(device)
            except Exception as e:  # a sticky device error: nothing on this device can run any more
                raise EngineFatalError(f"the device failed: {e}") from error
        logger.error("a model step over %d requests failed; each is recomputed once", len(chunks), exc_info=error)
        outputs = []
        for c in chunks:
            if c.seq in self._retried:
                outputs.append(self._fail(c.seq, error, traceback=False))
            else:
                self._retried.add(c.seq)
                self.scheduler.preempt(c.seq)
        return outputs

    def _fail(self, seq: Sequence, error: BaseException, traceback: bool = True) -> RequestOutput:
        """Finish seq with finish_reason "error"; its output says what failed."""
        logger.error("request %s failed: %s: %s", seq.request_id, type(error).__name__, error,
                     exc_info=error if traceback else None)
        self.requests.pop(seq.request_id, None)
        if not seq.finished:
            self.scheduler.finish(seq, "error")
        seq.finish_reason = "error"
        out = self._output(seq)
        out.outputs[0].error = f"{type(error).__name__}: {error}"
        return out

    def _pop_finished(self, seq: Sequence) -> RequestOutput:
        self.requests.pop(seq.request_id, None)
        return self._output(seq)

    def _append(self, seq: Sequence, token: int, logprobs) -> None:
        p = seq.params
        seq.append_token(token)
        self.num_generated_tokens += 1
        if seq.logprobs is not None:
            seq.logprobs.append(logprobs)
        complete = seq.constraints.accept(token) if seq.constraints is not None else False
        seq.detokenizer.add(token)
        text = seq.detokenizer.text
        reason, stop_reason = None, None
        early = len(seq.output_token_ids) < p.min_tokens  # no stop string yet (EOS and stop ids are masked)
        if token in self.eos_token_ids and not p.ignore_eos:
            reason = "stop"
        elif token in p.stop_token_ids:
            reason, stop_reason = "stop", token
        else:
            stop = None
            if not early:
                text, stop = cut_at_stop(text, seq.text, p)
            if stop is not None:
                reason, stop_reason = "stop", stop
            elif complete:  # the grammar allows nothing more
                reason = "stop"
            elif p.max_tokens is not None and len(seq.output_token_ids) >= p.max_tokens:
                reason = "length"
            elif seq.num_tokens >= self.max_model_len:
                reason = "length"
        seq.text = hold_back(text, seq.text, p) if reason is None else text
        if reason is not None:
            seq.stop_reason = stop_reason
            self.scheduler.finish(seq, reason)

    def _output(self, seq: Sequence) -> RequestOutput | None:
        """The request's output in its params' output_kind (None: a final_only request still running)."""
        out = completion_output(seq, seq.output_token_ids)
        if out is None:
            return None
        kind = seq.params.output_kind
        prompt_lps = None
        if seq.prompt_logprobs is not None and not (kind == "delta" and seq.sent_prompt_logprobs) \
                and not prompt_logprobs.wants_prompt_logprobs(seq):
            prompt_lps, seq.sent_prompt_logprobs = seq.prompt_logprobs, True
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [out], finished=seq.finished,
                             prompt_logprobs=prompt_lps)

    # ---- whole-prompt logits (numerical comparison with other implementations) -----------------

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Next-token logits at every prompt position, [len(token_ids), vocab] fp32, computed in chunks of
        the step token budget with the state carried between chunks."""
        self.validate_prompt(token_ids)
        seq = Sequence("prompt-logits", token_ids, SamplingParams(max_tokens=1))
        if not self.cache.allocate(seq, len(token_ids)):
            raise RuntimeError("prompt_logits needs a free state slot and KV blocks for the whole prompt; "
                               "wait for running requests to finish")
        try:
            parts = []
            while seq.num_computed < len(token_ids):
                n = min(len(token_ids) - seq.num_computed, self.scheduler.token_budget)
                parts.append(self.runner.run([ScheduledChunk(seq, n)], all_logits=True))
            return torch.cat(parts)
        finally:
            self.cache.release(seq)


def check_prompt(ids: list[int], max_model_len: int, vocab_size: int) -> None:
    """ValueError unless ids is a prompt an engine of this context and vocabulary can run."""
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    if len(ids) >= max_model_len:
        raise ValueError(f"the prompt has {len(ids)} tokens, but this model's context is {max_model_len} "
                         f"tokens (prompt plus at least one generated token)")
    bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size}), got {bad[:5]}")

