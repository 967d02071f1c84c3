"""Incremental detokenization that never emits half of a multi-byte UTF-8 character."""


class IncrementalDetokenizer:
    """Feed generated token ids one at a time; each `add` returns the newly completed text and `text`
    holds all of it. Only a short window of tokens is decoded per step (cost independent of the output
    length): the window starts a few tokens back so that spacing at token boundaries comes out right.
    A byte-level token that ends inside a UTF-8 character decodes to U+FFFD; that tail is held back
    until the following tokens complete it."""

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.tokens = list(prompt_ids[-5:])
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = len(self.tokens)  # tokens before this are already in `text`
        self.text = ""

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        self.tokens.append(token_id)
        if self.tokenizer is None:
            return ""
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new yet, or an incomplete character: wait for the bytes that finish it
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        self.text += delta
        return delta
