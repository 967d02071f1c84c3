"""MiniMax-M1 tool calls -> OpenAI tool_calls, on texts in the model's format (the function-call guide's
recorded output and variations), whole and streamed a character at a time, composed with the reasoning
parser."""
import json
import re

import pytest

from minimax_m1.server.chat_output import ChatOutputParser, parse_chat_output

# the guide's recorded output: thinking, then two calls of one tool, arguments with escaped quotes
RECORDED = (
    '<think>\nOkay, I will search for the OpenAI and Gemini latest release.\n</think>\n<tool_calls>\n'
    '{"name": "search_web", "arguments": {"query_tag": ["technology", "events"], '
    '"query_list": ["\\"OpenAI\\" \\"latest\\" \\"release\\""]}}\n'
    '{"name": "search_web", "arguments": {"query_tag": ["technology", "events"], '
    '"query_list": ["\\"Gemini\\" \\"latest\\" \\"release\\""]}}\n</tool_calls>')
WEATHER = '{"name": "get_weather", "arguments": {"location": "Paris, FR", "unit": "celsius"}}'

# (name, output, expected reasoning, expected content, expected [(name, arguments as a Python value)])
CASES = [
    ("one call", f"<tool_calls>\n{WEATHER}\n</tool_calls>", None, None,
     [("get_weather", {"location": "Paris, FR", "unit": "celsius"})]),
    ("several calls", '<tool_calls>\n{"name": "a", "arguments": {"x": 1}}\n{"name": "b", "arguments": {}}\n'
     '{"name": "c", "arguments": {"nested": {"list": [1, {"k": "v}"}]}}}\n</tool_calls>', None, None,
     [("a", {"x": 1}), ("b", {}), ("c", {"nested": {"list": [1, {"k": "v}"}]}})]),
    ("calls after thinking", RECORDED, "\nOkay, I will search for the OpenAI and Gemini latest release.\n", None,
     [("search_web", {"query_tag": ["technology", "events"], "query_list": ['"OpenAI" "latest" "release"']}),
      ("search_web", {"query_tag": ["technology", "events"], "query_list": ['"Gemini" "latest" "release"']})]),
    ("tag inside think", f"<think>I could answer with <tool_calls>\n{WEATHER}\n</tool_calls> here.</think>\n"
     "It is sunny.", f"I could answer with <tool_calls>\n{WEATHER}\n</tool_calls> here.", "\nIt is sunny.", []),
    ("malformed line", '<tool_calls>\n{"name": "a", "arguments": {"x": 1}}\nthis is not json\n{"name": 3}\n'
     '{"name": "b", "arguments": {"y": [2]}}\n{"name": "c", "arguments": </tool_calls>', None, None,
     [("a", {"x": 1}), ("b", {"y": [2]}), ("c", {})]),
    ("text before the tag", f"Let me check the weather.\n\n<tool_calls>\n{WEATHER}\n</tool_calls>", None,
     "Let me check the weather.", [("get_weather", {"location": "Paris, FR", "unit": "celsius"})]),
    ("text after thinking, then calls", f"<think>hm</think>\n\nChecking.\n<tool_calls>\n{WEATHER}\n</tool_calls>\n",
     "hm", "\n\nChecking.", [("get_weather", {"location": "Paris, FR", "unit": "celsius"})]),
    ("keys in another order", '<tool_calls>\n{"arguments": {"q": "x"}, "name": "find"}\n</tool_calls>', None, None,
     [("find", {"q": "x"})]),
    ("arguments as a JSON string", '<tool_calls>\n{"name": "f", "arguments": "{\\"k\\": [1]}"}\n</tool_calls>',
     None, None, [("f", {"k": [1]})]),
    ("no arguments", '<tool_calls>\n{"name": "now"}\n</tool_calls>', None, None, [("now", {})]),
    ("pretty-printed and two on a line", '<tool_calls>\n{\n  "name": "a",\n  "arguments": {\n    "x": 1\n  }\n}\n'
     '{"name": "b", "arguments": {}} {"name": "c", "arguments": {"s": "</tool_calls>"}}\n</tool_calls>', None, None,
     [("a", {"x": 1}), ("b", {}), ("c", {"s": "</tool_calls>"})]),
    ("no valid call: the block stays content", "Here:\n<tool_calls>\nnot a call\n</tool_calls>", None,
     "Here:\n<tool_calls>\nnot a call\n</tool_calls>", []),
    ("plain answer with a lone <", "2 < 3 and <tool is not a tag", None, "2 < 3 and <tool is not a tag", []),
    ("cut off inside a call", '<tool_calls>\n{"name": "f", "arguments": {"city": "Par', None, None,
     [("f", '{"city": "Par')]),
    ("text after the block", f"<tool_calls>\n{WEATHER}\n</tool_calls>\nAnything else?", None, "Anything else?",
     [("get_weather", {"location": "Paris, FR", "unit": "celsius"})]),
]


def _calls(calls):
    """[(name, arguments parsed as JSON, or the raw string where it is not JSON)]."""
    out = []
    for c in calls:
        assert c["type"] == "function" and re.fullmatch(r"call_[0-9a-f]{24}", c["id"])
        assert isinstance(c["function"]["arguments"], str)
        try:
            args = json.loads(c["function"]["arguments"])
        except json.JSONDecodeError:
            args = c["function"]["arguments"]
        out.append((c["function"]["name"], args))
    return out


def _stream(text, pieces, prompt="", reasoning=True):
    """Feed `text` in the given cumulative cut points; rebuild the message from the deltas."""
    parser = ChatOutputParser(prompt, reasoning=reasoning, tools=True)
    reasoning_text, content, calls = "", "", {}
    for i, end in enumerate(pieces):
        d = parser.feed(text[:end], final=i == len(pieces) - 1)
        reasoning_text += d.reasoning
        content += d.content
        for tc in d.tool_calls:
            if "id" in tc:  # a call's first delta: index, id, type, name, arguments ""
                assert tc["index"] == len(calls) and tc["type"] == "function"
                assert tc["function"]["arguments"] == "" and tc["function"]["name"]
                calls[tc["index"]] = {"id": tc["id"], "type": "function",
                                      "function": {"name": tc["function"]["name"], "arguments": ""}}
            else:  # then argument pieces only
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                calls[tc["index"]]["function"]["arguments"] += tc["function"]["arguments"]
    return reasoning_text, content, [calls[i] for i in range(len(calls))], parser


@pytest.mark.parametrize("name,text,reasoning,content,calls", CASES, ids=[c[0] for c in CASES])
def test_whole_output(name, text, reasoning, content, calls):
    got_reasoning, got_content, got_calls = parse_chat_output(text, tools=True)
    assert (got_reasoning, got_content) == (reasoning, content)
    assert _calls(got_calls) == calls
    assert len({c["id"] for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("name,text,reasoning,content,calls", CASES, ids=[c[0] for c in CASES])
def test_streamed_one_character_at_a_time(name, text, reasoning, content, calls):
    got_reasoning, got_content, got_calls, parser = _stream(text, range(1, len(text) + 1))
    assert got_reasoning == (reasoning or "") and got_content == (content or "")
    assert _calls(got_calls) == calls
    assert got_calls == parser.tool_calls  # the deltas add up to the parser's own record


def test_streamed_arguments_arrive_in_pieces_before_the_call_ends():
    text = f"<tool_calls>\n{WEATHER}\n</tool_calls>"
    parser = ChatOutputParser(tools=True)
    cut = text.index('"Paris') + 3
    first = parser.feed(text[:cut])
    assert first.tool_calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert first.tool_calls[1]["function"]["arguments"] == '{"location": "Pa'
    assert not parser.feed(text[:cut]), "nothing new to say"


def test_possible_tag_is_held_back_then_released():
    parser = ChatOutputParser(tools=True)
    assert parser.feed("Sure <tool").content == "Sure"  # " <tool" might open a block
    d = parser.feed("Sure <toolbox> is here")
    assert d.content == " <toolbox> is here" and not d.tool_calls
    assert parser.feed("Sure <toolbox> is here  ").content == ""  # trailing spaces wait...
    assert parser.feed("Sure <toolbox> is here  ", final=True).content == "  "  # ...until the end


def test_reasoning_parser_off_keeps_think_block_as_content():
    text = f"<think>maybe <tool_calls>\n{WEATHER}\n</tool_calls></think>\nok\n<tool_calls>\n{WEATHER}\n</tool_calls>"
    reasoning, content, calls = parse_chat_output(text, reasoning=False, tools=True)
    assert reasoning is None and content == text[:text.index("ok") + 2] and len(calls) == 1
    streamed = _stream(text, range(1, len(text) + 1), reasoning=False)
    assert streamed[1] == content and _calls(streamed[2]) == _calls(calls)


def test_prompt_opened_think_block():
    """A template that ends the prompt with <think> leaves the model inside the block from its first token."""
    text = f"I might call <tool_calls>\n{WEATHER}\n</tool_calls></think>\n<tool_calls>\n{WEATHER}\n</tool_calls>"
    prompt = "<beginning_of_sentence>ai name=assistant\n<think>\n"
    for reasoning_on in (True, False):
        reasoning, content, calls = parse_chat_output(text, prompt, reasoning=reasoning_on, tools=True)
        assert len(calls) == 1
        if reasoning_on:
            assert reasoning.startswith("I might call") and content is None
        else:
            assert reasoning is None and content.endswith("</think>")
        streamed = _stream(text, range(1, len(text) + 1), prompt, reasoning=reasoning_on)
        assert _calls(streamed[2]) == _calls(calls)


def test_tools_off_is_the_reasoning_split():
    from minimax_m1.server.reasoning import split_reasoning
    for _, text, *_ in CASES:
        reasoning, content, calls = parse_chat_output(text, tools=False)
        assert (reasoning, content) == split_reasoning(text) and calls == []


@pytest.mark.parametrize("step", [2, 3, 7, 16])
def test_streamed_in_larger_pieces(step):
    for _, text, *_ in CASES:
        whole = parse_chat_output(text, tools=True)
        cuts = list(range(step, len(text), step)) + [len(text)]
        reasoning, content, calls, _ = _stream(text, cuts)
        assert _calls(calls) == _calls(whole[2]) and content.strip() == (whole[1] or "").strip()
