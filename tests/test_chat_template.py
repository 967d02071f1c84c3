"""OpenAI-shaped tool conversations through the released chat template (when the shared file is present) and
the tiny one: what the model must see, the round trip parse -> render, and bad messages as errors."""
import json

import pytest

from minimax_m1.server.chat_output import parse_chat_output
from minimax_m1.tokenizer import TINY_CHAT_TEMPLATE, template_messages, tiny_tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "Checking both.", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": "18C and sunny"},
    {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "24C"}]},
    {"role": "assistant", "content": "Paris: 18C, Rome: 24C."},
    {"role": "user", "content": "Thanks!"},
]


@pytest.fixture(params=["tiny", "released"])
def tokenizer(request):
    tok = tiny_tokenizer()
    if request.param == "released":
        shared = request.getfixturevalue("shared_model_dir")
        tok.chat_template = json.loads((shared / "tokenizer_config.json").read_text())["chat_template"]
    return tok


def test_tool_conversation_renders_what_the_model_must_see(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION, tools=TOOLS)
    tools_turn = ("<beginning_of_sentence>system tool_setting=tools\nYou are provided with these tools:\n<tools>\n"
                  + json.dumps(TOOLS[0]["function"], ensure_ascii=False) + "\n</tools>\n")
    calls = ('<beginning_of_sentence>ai name=assistant\nChecking both.\n<tool_calls>\n'
             '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
             '{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_calls><end_of_sentence>\n')
    results = ("<beginning_of_sentence>tool name=tools\ntool name: get_weather\ntool result: 18C and sunny\n\n"
               "tool name: get_weather\ntool result: 24C\n\n<end_of_sentence>\n")
    for piece in (tools_turn, calls, results, "system ai_setting=assistant\nYou are helpful.<end_of_sentence>",
                  "<beginning_of_sentence>ai name=assistant\nParis: 18C, Rome: 24C.<end_of_sentence>\n"
                  "<beginning_of_sentence>user name=user\nThanks!<end_of_sentence>\n"):
        assert piece in text
    assert text.index(tools_turn) < text.index("user name=user\nWeather") < text.index(calls) < text.index(results)
    assert text.endswith("<beginning_of_sentence>ai name=assistant\n")
    # the guide's own shapes render the same: bare function objects, a tool message with named parts
    guide = CONVERSATION[:3] + [{"role": "tool", "content": [
        {"type": "text", "name": "get_weather", "text": "18C and sunny"},
        {"type": "text", "name": "get_weather", "text": "24C"}]}] + CONVERSATION[5:]
    assert tokenizer.apply_chat_template(guide, tools=[TOOLS[0]["function"]]) == text


def test_no_tools_no_tools_turn(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION[:2])
    assert "tool_setting" not in text and "<tools>" not in text


def test_model_output_round_trips(tokenizer):
    """What the parser takes out of an answer renders back as the block the model wrote."""
    written = ('<tool_calls>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
               '{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_calls>')
    _, content, calls = parse_chat_output("<think>two cities</think>\n" + written, tools=True)
    history = CONVERSATION[:2] + [{"role": "assistant", "content": content, "tool_calls": calls}]
    text = tokenizer.apply_chat_template(history, add_generation_prompt=False)
    assert text.endswith("<beginning_of_sentence>ai name=assistant\n" + written + "<end_of_sentence>\n")


def test_continue_final_message(tokenizer):
    history = CONVERSATION[:2] + [{"role": "assistant", "content": "The weather in Paris is"}]
    text = tokenizer.apply_chat_template(history, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<beginning_of_sentence>ai name=assistant\nThe weather in Paris is")
    with pytest.raises(ValueError, match="add_generation_prompt"):
        tokenizer.apply_chat_template(history, continue_final_message=True)
    with pytest.raises(ValueError, match="assistant"):
        tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=False, continue_final_message=True)


def test_template_override_and_kwargs():
    tok = tiny_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="{{ greeting }} "
                                   "{{ messages[0]['content'][0]['text'] }}", greeting="hello")
    assert text == "hello hi"
    assert tok.chat_template == TINY_CHAT_TEMPLATE
    with pytest.raises(ValueError, match="does not compile"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="{% if %}")


@pytest.mark.parametrize("messages,match", [
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "function", "content": "x"}], "unknown role 'function'"),
    ([{"content": "x"}], r"messages\[0\]"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text parts"),
    ([{"role": "tool", "tool_call_id": "nope", "content": "x"}], "tool_call_id 'nope'"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]}], r"tool_calls\[0\]"),
])
def test_bad_messages_are_errors(messages, match):
    with pytest.raises(ValueError, match=match):
        tiny_tokenizer().apply_chat_template(messages)


def test_mapping_keeps_other_keys_and_joins_text_parts():
    out = template_messages([{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                               {"type": "text", "text": "b"}], "x": 1},
                             {"role": "assistant", "content": "hm", "tool_calls": [
                                 {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]},
                             {"role": "tool", "tool_call_id": "c1", "content": "r"}])
    assert out[0] == {"role": "system", "content": [{"type": "text", "text": "a\nb"}], "x": 1}
    # arguments that are not JSON are shown back as the model wrote them
    assert out[1]["content"][0]["text"] == 'hm\n<tool_calls>\n{"name": "f", "arguments": {bad}\n</tool_calls>'
    assert out[2]["content"] == [{"type": "text", "name": "f", "text": "r", "tool_call_id": "c1"}]
