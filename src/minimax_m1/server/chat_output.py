"""A chat answer's parts: reasoning_content, content and tool_calls, split the same way whole or streamed.

The composition, in one place: the reasoning parser runs first on the raw output and splits off the <think>
block; the tool-call parser then reads only the answer part (so a <tool_calls> tag while thinking is never a
call). With the reasoning parser off, the raw output goes to the tool-call parser, which passes a <think>
block through as content untouched (and still finds no calls in it); with the tool parser off (no tools, or
tool_choice "none"), the answer is all content."""
from __future__ import annotations

import dataclasses

from .reasoning import START as THINK_START
from .reasoning import ReasoningParser
from .tool_parser import ToolCallParser


@dataclasses.dataclass
class ChatDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = dataclasses.field(default_factory=list)  # OpenAI stream deltas, with "index"

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class ChatOutputParser:
    """Feed the cumulative output text of one choice; get the new parts since the last call as a ChatDelta.
    prompt: the rendered prompt (a template may open the <think> block for the model)."""

    def __init__(self, prompt: str = "", reasoning: bool = True, tools: bool = False):
        self._reasoning = ReasoningParser(prompt) if reasoning else None
        opened = prompt.rstrip().endswith(THINK_START)
        self._tools = ToolCallParser(in_think=opened and not reasoning) if tools else None
        self._answer = ""  # the answer text so far (after the reasoning parser)
        self._seen = 0

    @property
    def reasoned(self) -> bool:
        return self._reasoning is not None and self._reasoning.reasoned

    @property
    def tool_calls(self) -> list[dict]:
        """The calls parsed so far, OpenAI-shaped ({"id", "type", "function": {"name", "arguments"}})."""
        return self._tools.calls if self._tools else []

    def feed(self, text: str, final: bool = False) -> ChatDelta:
        if self._reasoning is not None:
            reasoning, answer = self._reasoning.feed(text, final)
            self._answer += answer
        else:
            reasoning, self._answer = "", text
        if self._tools is None:
            content, self._seen = self._answer[self._seen:], len(self._answer)
            return ChatDelta(reasoning, content)
        content, calls = self._tools.feed(self._answer, final)
        return ChatDelta(reasoning, content, calls)


def parse_chat_output(text: str, prompt: str = "", reasoning: bool = True,
                      tools: bool = False) -> tuple[str | None, str | None, list[dict]]:
    """A whole output -> (reasoning_content, content, tool_calls). reasoning_content is None when the output
    has no reasoning part (or the reasoning parser is off); content is None when empty, and when only
    whitespace is left beside tool calls; an output cut off while still reasoning has content None."""
    parser = ChatOutputParser(prompt, reasoning, tools)
    delta = parser.feed(text, final=True)
    content = delta.content
    if parser.tool_calls and not content.strip():
        content = ""
    return (delta.reasoning if parser.reasoned else None), content or None, parser.tool_calls
