"""Structured output through the official ``openai`` client and the SDK.

One deployment (tiny-llama, random weights, fp32) serves the module. Requests sample at
temperature 1 with a seed: the random model wants arbitrary text, and the grammar must
hold whatever it wants. Every output must parse and validate against its schema.
"""

from __future__ import annotations

import json
import re
import string
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.http.shim import serve_http
from xllm.protocol import StructuredOutput
from xllm.sdk import Client
from xllm.sdk.errors import BadRequestError

SAMPLE = {"temperature": 1.0, "max_tokens": 512}


@pytest.fixture(scope="module")
def shim(make_tiny, tmp_path_factory):
    with serve_http(make_tiny("tiny-llama"), tmp_path_factory.mktemp("http-structured")) as s:
        yield s


@pytest.fixture(scope="module")
def oai(shim):
    client = shim.openai(timeout=120)
    yield client
    client.close()


# -- schemas ----------------------------------------------------------------------------------
NAMES = st.text(string.ascii_lowercase + "_", min_size=1, max_size=8)


@st.composite
def _string(draw):
    hi = draw(st.integers(0, 8))
    return {"type": "string", "minLength": draw(st.integers(0, hi)), "maxLength": hi}


@st.composite
def _integer(draw):
    lo = draw(st.integers(-1000, 1000))
    return {"type": "integer", "minimum": lo, "maximum": lo + draw(st.integers(0, 5000))}


@st.composite
def _number(draw):
    lo = draw(st.integers(-100, 100))
    return {"type": "number", "minimum": lo, "maximum": lo + draw(st.integers(1, 1000))}


LEAVES = st.one_of(
    _string(), _integer(), _number(), st.just({"type": "boolean"}),
    st.lists(st.text(string.ascii_letters + " -", min_size=1, max_size=6), min_size=1, max_size=4,
             unique=True).map(lambda xs: {"enum": xs}),
)


@st.composite
def _object(draw, children):
    props = draw(st.dictionaries(NAMES, children, min_size=1, max_size=4))
    required = draw(st.lists(st.sampled_from(sorted(props)), min_size=1, unique=True))
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


@st.composite
def _array(draw, children):
    hi = draw(st.integers(0, 3))
    return {"type": "array", "items": draw(children), "minItems": draw(st.integers(0, hi)), "maxItems": hi}


SCHEMAS = _object(st.recursive(LEAVES, lambda kids: st.one_of(_object(kids), _array(kids)), max_leaves=6))


def ask(oai, model: str, schema: dict, seed: int, stream: bool) -> tuple[str, str]:
    """The chat answer under ``schema`` and its finish reason."""
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": "Give me a JSON value."}]
    if not stream:
        r = oai.chat.completions.create(model=model, messages=messages, response_format=fmt, seed=seed, **SAMPLE)
        return r.choices[0].message.content, r.choices[0].finish_reason
    chunks = [c for c in oai.chat.completions.create(model=model, messages=messages, response_format=fmt,
                                                      seed=seed, stream=True, **SAMPLE) if c.choices]
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


@pytest.mark.slow
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=SCHEMAS, seed=st.integers(0, 2**31))
def test_json_schema_output_always_validates(shim, oai, schema, seed):
    """50 random schemas, each asked streaming and not at once (two rows of one batch)."""
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda stream: ask(oai, shim.model, schema, seed, stream), (False, True)))
    for text, finish in answers:
        assert finish == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_gives_an_object(shim, oai):
    """Any object is unbounded (a key may go on for ever), so a random model can run out of
    tokens inside one: what ends is an object, what is cut is the start of one."""
    finished = 0
    for seed in range(4):
        r = oai.chat.completions.create(model=shim.model, messages=[{"role": "user", "content": "JSON please"}],
                                        response_format={"type": "json_object"}, seed=seed, **SAMPLE)
        text = r.choices[0].message.content
        if r.choices[0].finish_reason == "stop":
            finished += 1
            assert isinstance(json.loads(text), dict)
        else:
            assert text.startswith("{")
    assert finished


def test_guided_regex_output_matches(shim, oai):
    pattern = r"[a-z]{2,5}-[0-9]{3}( (yes|no))?"
    for seed in range(3):
        r = oai.completions.create(model=shim.model, prompt="An id:", seed=seed, **SAMPLE,
                                   extra_body={"guided_regex": pattern})
        assert r.choices[0].finish_reason == "stop"
        assert re.fullmatch(pattern, r.choices[0].text), r.choices[0].text


def test_grammar_and_choice_fields(shim, oai):
    lark = 'start: "(" item ("," item)* ")"\nitem: /[0-9]/ | "x"'
    r = oai.completions.create(model=shim.model, prompt="A tuple:", seed=1, **SAMPLE,
                               extra_body={"structured_outputs": {"grammar": lark}})
    assert re.fullmatch(r"\(([0-9]|x)(,([0-9]|x))*\)", r.choices[0].text), r.choices[0].text
    r = oai.completions.create(model=shim.model, prompt="Pick:", seed=2, **SAMPLE,
                               extra_body={"guided_choice": ["red", "green", "blue"]})
    assert r.choices[0].text in {"red", "green", "blue"}


@pytest.mark.parametrize("schema, named", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, '"if", "then"'),
    ({"not": {"type": "string"}}, "not"),
])
def test_an_unsupported_schema_feature_is_a_400_naming_it(shim, oai, schema, named):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=shim.model, messages=[{"role": "user", "content": "hi"}],
                                    response_format=fmt, max_tokens=8)
    err = info.value.body
    assert info.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert named in err["message"] and err["param"] == "response_format"


def test_bad_grammars_refused_while_others_run(shim, oai):
    """Refused grammars are 400s at the door; a request in flight meanwhile runs to its end."""
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(lambda: oai.completions.create(
            model=shim.model, prompt="Count:", max_tokens=200, temperature=1.0, seed=5, stream=True,
            extra_body={"ignore_eos": True}))
        bad = [{"guided_regex": "a(b"}, {"guided_grammar": "start: nowhere"},
               {"structured_outputs": {"json": "{not json"}}, {"guided_json": {"type": "objectx"}},
               {"guided_regex": "a", "guided_json": {"type": "object"}}]
        for extra in bad:
            with pytest.raises(openai.BadRequestError):
                oai.completions.create(model=shim.model, prompt="x", max_tokens=4, extra_body=extra)
        chunks = [c for c in long.result() if c.choices]
    assert chunks[-1].choices[0].finish_reason == "length"
    r = oai.completions.create(model=shim.model, prompt="Pick:", seed=3, **SAMPLE,
                               extra_body={"guided_choice": ["ok"]})
    assert r.choices[0].text == "ok"


def test_sdk_structured_output_and_its_error(shim):
    with Client(shim.dep.address) as c:
        out = c.generate("A date:", structured=StructuredOutput("regex", r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"),
                         temperature=1.0, seed=4, max_tokens=64)
        assert out.finish_reason == "stop" and re.fullmatch(r"20\d\d-[01]\d-[0-3]\d", out.text)
        with pytest.raises(BadRequestError, match="uniqueItems") as info:
            c.generate("x", structured=StructuredOutput("json_schema", '{"uniqueItems": true}'), max_tokens=4)
        assert info.value.param == "structured"
        with pytest.raises(BadRequestError, match="ignore_eos"):
            c.generate("x", structured=StructuredOutput("json"), ignore_eos=True, max_tokens=4)
