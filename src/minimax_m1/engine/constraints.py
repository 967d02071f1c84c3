"""The engine's side of a request's output constraints: its grammar matcher (compiled here, in the engine,
from the plain StructuredOutputsParams the request carries), where it stands relative to the model's
<think> block, the token ids min_tokens holds back and the bad words as token ids. Each step turns the batch's
states into LogitConstraints for the sampler (host data only); each sampled token advances them."""
from __future__ import annotations

import torch

from ..layers.logit_constraints import LogitConstraints
from ..sampling_params import SamplingParams
from ..structured.grammar import GrammarMatcher, fill_token_bitmask

THINK_START, THINK_END = "<think>", "</think>"
_PROMPT_TAIL = 4  # a template that opens the <think> block for the model ends the prompt with it (and a newline)


class RequestConstraints:
    """One request's constraint state. phase (with a grammar): "active" (the grammar decides), "open" (the
    first token may also be <think>), "thinking" (unconstrained until </think>)."""

    def __init__(self, matcher: GrammarMatcher | None, phase: str, stop_ids: list[int],
                 bad_words: list[list[int]], think_ids: tuple[int, int] | None):
        self.matcher, self.phase = matcher, phase
        self.stop_ids = stop_ids
        self.bad_words = bad_words
        self.think_ids = think_ids

    @classmethod
    def create(cls, params: SamplingParams, prompt_token_ids: list[int], *, compiler, tokenizer,
               eos_token_ids) -> RequestConstraints | None:
        """None when the request has nothing for this class to track. compiler: a callable returning the
        engine's GrammarCompiler (built on first use). Raises UnsupportedGrammarError for a constraint that
        cannot be compiled."""
        so = params.structured_outputs
        if so is None and not params.min_tokens and not params.bad_words:
            return None
        think = think_token_ids(tokenizer)
        matcher, phase = None, "active"
        if so is not None:
            matcher = compiler().matcher(so)
            if think is not None and _prompt_opens_think(prompt_token_ids, think):
                phase = "thinking"
            elif think is not None and so.after_reasoning:
                phase = "open"
        stop_ids = sorted(set(eos_token_ids) | set(params.stop_token_ids)) if params.min_tokens else []
        bad = _bad_word_ids(params.bad_words, tokenizer) if params.bad_words else []
        return cls(matcher, phase, stop_ids, bad, think)

    def accept(self, token: int) -> bool:
        """Advance with a sampled token; True when the grammar is complete (the output ends here)."""
        if self.matcher is None:
            return False
        if self.phase == "thinking":
            if token == self.think_ids[1]:
                self.phase = "active"
            return False
        if self.phase == "open":
            if token == self.think_ids[0]:
                self.phase = "thinking"
                return False
            self.phase = "active"
        if not self.matcher.accept(token):
            raise ValueError(f"the sampled token {token} breaks the request's grammar: {self.matcher.error}")
        return self.matcher.is_terminated

    @property
    def grammar_now(self) -> GrammarMatcher | None:
        """The matcher that constrains the next token (None while thinking)."""
        return self.matcher if self.phase != "thinking" else None


def think_token_ids(tokenizer) -> tuple[int, int] | None:
    if tokenizer is None:
        return None
    start, end = tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(THINK_END)
    return None if start is None or end is None else (start, end)


def _prompt_opens_think(ids: list[int], think: tuple[int, int]) -> bool:
    for token in reversed(ids[-_PROMPT_TAIL:]):
        if token in think:
            return token == think[0]
    return False


def _bad_word_ids(words: list[str], tokenizer) -> list[list[int]]:
    """Each bad word as tokens, as vLLM takes them: the word, and the word after a space (how it reads
    mid-sentence), each a token sequence whose last token is blocked where the rest has just been written."""
    if tokenizer is None:
        raise ValueError("bad_words needs a tokenizer (this model has no tokenizer.json)")
    out: list[list[int]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text)
            if ids and ids not in out:
                out.append(ids)
    return out


_BITMASKS: dict[int, torch.Tensor] = {}  # reused host buffers by vocabulary width (the engine loop is serial)


def build_logit_constraints(seqs, vocab_size: int) -> LogitConstraints | None:
    """The batch's LogitConstraints (None when no row has any): logit_bias from the settings, min_tokens and
    bad words as blocked tokens, the grammar rows' bitmask filled on CPU threads (llguidance)."""
    c = LogitConstraints()
    matchers: list[GrammarMatcher | None] = []
    think_rows: list[tuple[int, int]] = []
    for i, seq in enumerate(seqs):
        p, rc = seq.params, seq.constraints
        if p.logit_bias:
            c.bias_rows += [i] * len(p.logit_bias)
            c.bias_tokens += p.logit_bias.keys()
            c.bias_values += p.logit_bias.values()
        matcher = None
        if rc is not None:
            out = seq.output_token_ids
            if len(out) < p.min_tokens:
                c.blocked_rows += [i] * len(rc.stop_ids)
                c.blocked_tokens += rc.stop_ids
            for ids in rc.bad_words:
                if len(ids) == 1 or (len(out) >= len(ids) - 1 and out[len(out) - len(ids) + 1:] == ids[:-1]):
                    c.blocked_rows.append(i)
                    c.blocked_tokens.append(ids[-1])
            matcher = rc.grammar_now
            if rc.phase == "open":
                think_rows.append((i, rc.think_ids[0]))
        matchers.append(matcher)
    if any(m is not None for m in matchers):
        words = (vocab_size + 31) // 32
        buf = _BITMASKS.get(vocab_size)
        if buf is None or buf.shape[0] < len(seqs):
            buf = torch.full((max(len(seqs), 2 * (0 if buf is None else buf.shape[0])), words), -1,
                             dtype=torch.int32, pin_memory=torch.cuda.is_available())
            _BITMASKS[vocab_size] = buf
        bitmask = buf[:len(seqs)]
        fill_token_bitmask(bitmask, matchers)
        for row, token in think_rows:  # <think> may open the output before the grammar starts
            word = bitmask[row, token // 32].item() | (1 << (token % 32))
            bitmask[row, token // 32] = word - (1 << 32) if word >= 1 << 31 else word
        c.bitmask = bitmask
    return c or None
