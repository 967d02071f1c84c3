"""Structured outputs (llguidance): matchers driven by random sampling under the token bitmask, with the tiny
model's byte vocabulary and with a BPE vocabulary of multi-character tokens; every finished output must
satisfy its constraint, for 50 seeds. Also: the bitmask applied on the device equals a per-token reference,
errors that say what is unsupported, the compiled-grammar cache, the request fields."""
import json
import re

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from minimax_m1.structured import (
    GrammarCompiler,
    StructuredOutputsParams,
    UnsupportedGrammarError,
    allocate_token_bitmask,
    apply_token_bitmask,
    fill_token_bitmask,
    from_request,
)
from minimax_m1.tokenizer import BOS, EOS, TINY_SPECIALS, Tokenizer, tiny_tokenizer

SEEDS = range(50)
MAX_STEPS = 1500

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit", "kelvin"]},
        "ok": {"type": "boolean"},
        "where": {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                                   "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"}},
                  "required": ["lat", "city"], "additionalProperties": False},
        "readings": {"type": "array", "maxItems": 4, "items": {
            "type": "object", "properties": {"t": {"type": "integer", "minimum": 0, "maximum": 99},
                                             "tag": {"enum": ["a", "b", None]}},
            "required": ["t"], "additionalProperties": False}},
    },
    "required": ["name", "unit", "ok", "where", "readings"],
    "additionalProperties": False,
}


def _check_nested(value):
    """The schema's rules, checked by hand (in case jsonschema is absent)."""
    assert set(value) == set(NESTED["required"])
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert value["unit"] in ("celsius", "fahrenheit", "kelvin") and isinstance(value["ok"], bool)
    assert set(value["where"]) == {"lat", "city"} and -90 <= value["where"]["lat"] <= 90
    assert re.fullmatch("[A-Z][a-z]{1,8}", value["where"]["city"])
    assert len(value["readings"]) <= 4
    for r in value["readings"]:
        assert set(r) <= {"t", "tag"} and isinstance(r["t"], int) and 0 <= r["t"] <= 99
        assert r.get("tag", "a") in ("a", "b", None)


def bpe_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer trained here on JSON-like text: tokens of several characters (`{"`, `":`,
    `name`, ...) as the real checkpoint's tokenizer has, plus the tiny model's special tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [json.dumps({"name": f"city {i}", "unit": "celsius", "where": {"lat": i / 3, "city": "Paris"},
                          "readings": [{"t": i, "tag": "a"}], "ok": True}) for i in range(200)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=TINY_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus * 3, trainer)
    return Tokenizer(tok, EOS, BOS, None)


TOKENIZERS = {"tiny": tiny_tokenizer, "bpe": bpe_tokenizer}
_compilers = {}


def compiler(name) -> tuple[Tokenizer, GrammarCompiler]:
    if name not in _compilers:
        tok = TOKENIZERS[name]()
        # a model vocabulary wider than the tokenizer's (as the real checkpoint pads it): ids past it never allowed
        _compilers[name] = tok, GrammarCompiler(tok, tok.vocab_size + 7, tok.eos_token_ids)
    return _compilers[name]


def generate(tok, comp, params, seed, rows=3, row=1):
    """Random logits, masked, sampled: row `row` of a batch of `rows` carries the grammar, the others none.
    Returns the decoded text once EOS is drawn (or the grammar ends)."""
    gen = torch.Generator().manual_seed(seed)
    matcher = comp.matcher(params)
    bitmask = allocate_token_bitmask(rows, comp.vocab_size)
    tokens = []
    for _ in range(MAX_STEPS):
        assert fill_token_bitmask(bitmask, [matcher if i == row else None for i in range(rows)])
        logits = torch.randn(rows, comp.vocab_size, generator=gen) * 3
        free = logits[0].clone()
        apply_token_bitmask(logits, bitmask)
        assert torch.equal(logits[0], free), "a row without a grammar was masked"
        token = int(torch.multinomial(logits[row].softmax(-1), 1, generator=gen))
        assert token < tok.vocab_size, "a token past the tokenizer's vocabulary was allowed"
        assert matcher.accept(token), matcher.error
        if token in tok.eos_token_ids:
            break
        tokens.append(token)
        if matcher.is_terminated:
            break
    else:
        pytest.fail(f"seed {seed}: no end after {MAX_STEPS} tokens: {tok.decode(tokens)[:200]!r}")
    assert matcher.is_accepting and matcher.error is None
    return tok.decode(tokens, skip_special_tokens=False)


@pytest.mark.parametrize("vocab", TOKENIZERS)
def test_json_schema_outputs_validate(vocab):
    jsonschema = pytest.importorskip("jsonschema")
    tok, comp = compiler(vocab)
    params = StructuredOutputsParams(json=NESTED)
    for seed in SEEDS:
        value = json.loads(generate(tok, comp, params, seed))
        jsonschema.validate(value, NESTED)
        _check_nested(value)


@pytest.mark.parametrize("vocab", TOKENIZERS)
def test_regex_choice_and_grammar_outputs_match(vocab):
    tok, comp = compiler(vocab)
    regex = StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,4}( ok)?")
    choice = StructuredOutputsParams(choice=["yes", "no", "not sure"])
    grammar = StructuredOutputsParams(grammar='start: "SELECT " COL (", " COL)* " FROM t"\nCOL: /[a-c]/\n')
    seen = set()
    for seed in SEEDS:
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}( ok)?", generate(tok, comp, regex, seed))
        picked = generate(tok, comp, choice, seed)
        assert picked in ("yes", "no", "not sure")
        seen.add(picked)
        assert re.fullmatch(r"SELECT [a-c](, [a-c])* FROM t", generate(tok, comp, grammar, seed))
    assert seen == {"yes", "no", "not sure"}


def test_json_object_and_whitespace_options():
    tok, comp = compiler("tiny")
    for seed in range(20):
        assert isinstance(json.loads(generate(tok, comp, StructuredOutputsParams(json_object=True), seed)), dict)
    compact = StructuredOutputsParams(json=NESTED, disable_any_whitespace=True)
    for seed in range(10):
        text = generate(tok, comp, compact, seed)
        value = json.loads(text)
        _check_nested(value)
        assert text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    # additional properties: allowed by the schema's default, refused when asked
    loose = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    strict = StructuredOutputsParams(json=loose, disable_additional_properties=True)
    for seed in range(10):
        assert list(json.loads(generate(tok, comp, strict, seed))) == ["a"]


def test_choice_terminates_and_takes_eos():
    tok, comp = compiler("tiny")
    m = comp.matcher(StructuredOutputsParams(choice=["yes", "no"]))
    for t in tok.encode("yes"):
        assert not m.is_terminated and m.accept(t)
    assert m.is_terminated and m.accept(tok.eos_token_ids[0])
    m = comp.matcher(StructuredOutputsParams(choice=["yes", "no"]))
    assert not m.accept(tok.encode("x")[0]) and m.error


@pytest.mark.parametrize("vocab", [100, 262, 320, 1000])
def test_apply_bitmask_matches_reference(vocab):
    gen = torch.Generator().manual_seed(vocab)
    words = torch.randint(-2**31, 2**31, (5, (vocab + 31) // 32), dtype=torch.int64, generator=gen)
    bitmask = words.to(torch.int32)
    bitmask[2] = -1  # a row without a grammar
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(5, vocab, generator=gen).to(dtype)
        ref = logits.clone()
        for r in range(5):
            for t in range(vocab):
                if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                    ref[r, t] = float("-inf")
        out = apply_token_bitmask(logits, bitmask)
        assert out is logits and torch.equal(logits, ref)


@pytest.mark.gpu
def test_apply_bitmask_on_cuda_equals_cpu():
    gen = torch.Generator().manual_seed(0)
    vocab = 200064  # MiniMax-M1's
    bitmask = torch.randint(-2**31, 2**31, (16, vocab // 32), dtype=torch.int64, generator=gen).to(torch.int32)
    bitmask = bitmask.pin_memory()
    logits = torch.randn(16, vocab, generator=gen)
    on_gpu = logits.cuda()
    apply_token_bitmask(on_gpu, bitmask)  # warm up (the shift table)
    on_gpu = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # no wait for the GPU anywhere in it
    try:
        apply_token_bitmask(on_gpu, bitmask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(on_gpu.cpu(), apply_token_bitmask(logits, bitmask))


@pytest.mark.parametrize("params,match", [
    (dict(json={"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}),
     "JSON schema is not supported: .*https://example.com/a.json"),
    (dict(json={"type": "integer", "minimum": 5, "maximum": 3}), "JSON schema is not supported: .*minimum"),
    (dict(regex="a(b"), "(?s)regex is not supported: .*unclosed group"),
    (dict(grammar="start: undefined_rule"), "(?s)grammar is not supported: .*undefined_rule"),
])
def test_unsupported_constraints_say_what(params, match):
    _, comp = compiler("tiny")
    with pytest.raises(UnsupportedGrammarError, match=match):
        comp.matcher(StructuredOutputsParams(**params))


def test_compiled_grammars_are_cached_by_spec():
    _, comp = compiler("tiny")
    a = comp.compile(StructuredOutputsParams(json=NESTED))
    assert comp.compile(StructuredOutputsParams(json=json.dumps(NESTED))) is a  # the same schema as text
    assert comp.compile(StructuredOutputsParams(json=NESTED, disable_any_whitespace=True)) is not a


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one"), (dict(json={}, regex="a"), "exactly one"), (dict(choice=[]), "choice"),
    (dict(json="{bad"), "not valid JSON"), (dict(regex=""), "regex"),
])
def test_bad_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructuredOutputsParams(**kwargs)


def test_request_fields():
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    assert from_request() is None and from_request(response_format={"type": "text"}) is None
    assert from_request(response_format={"type": "json_object"}) == StructuredOutputsParams(json_object=True)
    got = from_request(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                                "strict": True}})
    assert got == StructuredOutputsParams(json=schema)
    assert from_request(guided_json=json.dumps(schema)) == got
    assert from_request(guided_regex="a+") == StructuredOutputsParams(regex="a+")
    assert from_request(guided_choice=["a", "b"]) == StructuredOutputsParams(choice=["a", "b"])
    assert from_request(structured_outputs={"choice": ["a", "b"]}) == StructuredOutputsParams(choice=("a", "b"))
    assert from_request(guided_grammar="start: \"a\"").kind == "grammar"
    for kwargs, match in [(dict(guided_json=schema, guided_regex="a"), "guided_json and guided_regex"),
                          (dict(response_format={"type": "xml"}), "'xml' is not supported"),
                          (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "schema"),
                          (dict(structured_outputs={"structural_tag": "x"}), "structural_tag")]:
        with pytest.raises(ValueError, match=match):
            from_request(**kwargs)


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {},
                                                                     "additionalProperties": False}}},
]


@pytest.mark.parametrize("vocab", TOKENIZERS)
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_parse_and_validate(vocab, choice):
    """tool_choice required / named: the grammar makes the model write the <tool_calls> block; the tool-call
    parser reads it back, and each call's arguments satisfy that tool's parameters."""
    jsonschema = pytest.importorskip("jsonschema")
    from minimax_m1.server.chat_output import parse_chat_output
    from minimax_m1.structured.tools import tool_choice_params

    tok, comp = compiler(vocab)
    params = tool_choice_params(TOOLS, choice)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in SEEDS:
        text = generate(tok, comp, params, seed)
        _, content, calls = parse_chat_output(text, tools=True)
        assert content is None and calls, text
        if choice != "required":
            assert [c["function"]["name"] for c in calls] == ["get_weather"]
        for call in calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
        assert text.startswith('<tool_calls>\n{"name": "')  # as the model writes it


def test_tool_choice_errors():
    from minimax_m1.structured.tools import tool_choice_params

    assert tool_choice_params(TOOLS, "auto") is None and tool_choice_params(TOOLS, "none") is None
    for tools, choice, match in [(TOOLS, {"type": "function", "function": {"name": "nope"}}, "'nope'.*get_weather"),
                                 (None, "required", "needs tools"), (TOOLS, "always", "tool_choice must be")]:
        with pytest.raises(ValueError, match=match):
            tool_choice_params(tools, choice)
