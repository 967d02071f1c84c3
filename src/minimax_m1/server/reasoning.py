"""MiniMax-M1 reasons inside <think>...</think> before it answers: split that off as `reasoning_content`.

The output is in reasoning when it begins with <think> (after whitespace) or when the prompt already ends
with <think> (a chat template that opens the block for the model); the reasoning runs to </think>, the
answer follows it. An output that neither starts with <think> nor follows one is all answer. One parser
serves streaming and whole responses, so both split the same text the same way."""
from __future__ import annotations

START, END = "<think>", "</think>"


class ReasoningParser:
    """Feed the cumulative output text; get back the new reasoning and answer text since the last call.
    Text that may be the start of a tag is held back until the next call shows what it is (or final)."""

    def __init__(self, prompt: str = ""):
        self._mode = "reasoning" if prompt.rstrip().endswith(START) else "undecided"
        self.reasoned = self._mode == "reasoning"  # whether this output has a reasoning part
        self._seen = 0  # characters of the output consumed so far

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """text: the whole output so far. Returns (reasoning delta, answer delta)."""
        reasoning, content = "", ""
        while self._seen < len(text):
            new = text[self._seen:]
            if self._mode == "undecided":
                head = new.lstrip()
                if not final and (not head or START.startswith(head)):
                    break  # only whitespace or a partial <think> so far
                if head.startswith(START):
                    self._seen += len(new) - len(head) + len(START)
                    self._mode, self.reasoned = "reasoning", True
                else:
                    self._mode = "content"
            elif self._mode == "reasoning":
                end = new.find(END)
                if end >= 0:
                    reasoning += new[:end]
                    self._seen += end + len(END)
                    self._mode = "content"
                    continue
                keep = 0 if final else _partial_tag(new, END)
                reasoning += new[:len(new) - keep]
                self._seen += len(new) - keep
                break
            else:
                content += new
                self._seen = len(text)
        return reasoning, content


def split_reasoning(text: str, prompt: str = "") -> tuple[str | None, str | None]:
    """The whole output -> (reasoning_content, content), each None when absent. An output cut off while
    still reasoning has content None."""
    parser = ReasoningParser(prompt)
    reasoning, content = parser.feed(text, final=True)
    if not parser.reasoned:
        return None, content
    return reasoning, content or None


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
