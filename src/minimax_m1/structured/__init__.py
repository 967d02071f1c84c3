"""Structured outputs: constrain a request's tokens to a JSON schema, any JSON object, a regex, a choice of
strings or a grammar, through llguidance.

Why llguidance (not xgrammar): it is one abi3 wheel with no dependencies (xgrammar pulls in triton and
transformers), it reads our `tokenizers` JSON directly (LLTokenizer takes tokenizer.json's text: the real
checkpoint's byte-level BPE and the tiny byte tokenizer alike, no transformers tokenizer needed), it computes
the token bitmask on CPU threads for a whole batch in one call (so the mask for step t can be built while the
GPU runs), and it covers the JSON-schema features OpenAI's strict mode and vLLM use, with an error that names
what it does not support. vLLM ships it as one of its two structured-output backends.

Use (the engine side; see grammar.py):
    compiler = GrammarCompiler(tokenizer, vocab_size, eos_token_ids)     # once per engine
    matcher = compiler.matcher(params)        # per request; compiled grammars are cached by params.key
    fill_token_bitmask(bitmask, [matcher or None per row])                # host, each step
    apply_token_bitmask(logits, bitmask)      # device, one copy + element-wise ops, before sampling
    matcher.accept(token); matcher.is_terminated                          # after sampling
"""
from .grammar import (
    GrammarCompiler,
    GrammarMatcher,
    UnsupportedGrammarError,
    allocate_token_bitmask,
    apply_token_bitmask,
    fill_token_bitmask,
)
from .params import StructuredOutputsParams, from_request, from_response_format

__all__ = ["GrammarCompiler", "GrammarMatcher", "UnsupportedGrammarError", "StructuredOutputsParams",
           "allocate_token_bitmask", "apply_token_bitmask", "fill_token_bitmask", "from_request",
           "from_response_format"]
