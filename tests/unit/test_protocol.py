"""Every wire message survives encode -> frames -> decode, arrays included."""

from __future__ import annotations

import typing

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from xllm import protocol as P
from xllm.bus.codec import DecodeError, Decoder, EncodeError, Encoder

text = st.text(max_size=20)
small = st.integers(min_value=-(2**40), max_value=2**40)
json_value = st.recursive(st.none() | st.booleans() | small | text |
                          st.floats(allow_nan=False, allow_infinity=False),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                          max_leaves=8)
ndarrays = st.sampled_from([np.float32, np.int32, np.int64, np.uint8]).flatmap(
    lambda dt: arrays(dt, array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5)))

st.register_type_strategy(np.ndarray, ndarrays)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
st.register_type_strategy(int, int64)  # msgpack carries 64-bit integers


def strategy_for(cls):
    """A hypothesis strategy for a Struct, with ``Any`` fields drawn as JSON-like values."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for name in cls.__struct_fields__:
        hint = hints[name]
        if hint is typing.Any:
            fields[name] = json_value
        elif hint == dict[str, typing.Any]:
            fields[name] = st.dictionaries(text, json_value, max_size=3)
        elif hint == list[dict[str, typing.Any]]:
            fields[name] = st.lists(st.dictionaries(text, json_value, max_size=3), max_size=2)
        elif hint == dict[int, float]:
            fields[name] = st.dictionaries(small, st.floats(-100, 100), max_size=3)
        elif isinstance(hint, type) and issubclass(hint, msgspec.Struct):  # a message inside a message
            fields[name] = st.deferred(lambda h=hint: strategy_for(h))
        else:
            fields[name] = st.deferred(lambda h=hint: st.from_type(h))  # after all registrations
    return st.builds(cls, **fields)


MESSAGES = sorted({cls for union in P.ALL_UNIONS.values() for cls in typing.get_args(union)},
                  key=lambda c: c.__name__)
for cls in [P.SamplingParams, P.ChatMessage, P.ToolCall, P.ToolCallFunction, P.NewRequestData, P.RequestDelta,
            P.TokenLogprob, P.KVTierOp, P.BlockStored, P.BlockRemoved, *MESSAGES]:
    st.register_type_strategy(cls, strategy_for(cls))


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, msgspec.Struct):
        return type(a) is type(b) and all(_equal(getattr(a, f), getattr(b, f)) for f in a.__struct_fields__)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b  # NaN survives as NaN
    return a == b


@pytest.mark.parametrize("socket_name", sorted(P.ALL_UNIONS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_message_round_trips(socket_name, data):
    union = P.ALL_UNIONS[socket_name]
    msg = data.draw(st.sampled_from(typing.get_args(union)).flatmap(st.from_type))
    frames = Encoder().encode(msg)
    # what a ZeroMQ peer gets: separate byte buffers, arrays outside the payload
    received = [bytes(f) for f in frames]
    assert _equal(Decoder(union).decode(received), msg)


def test_arrays_travel_as_their_own_frames():
    top = np.arange(12, dtype=np.int32).reshape(3, 4)
    msg = P.StepResult(7, ["a"], [1], 0.5, ["a"], np.ones(3, np.float32), top, top.astype(np.float32))
    frames = Encoder().encode(msg)
    assert len(frames) == 4 and bytes(frames[2]) == top.tobytes()
    back = Decoder(P.WorkerOutput).decode(frames)
    assert np.array_equal(back.logprobs, np.ones(3, np.float32))
    assert np.array_equal(back.top_ids, top) and back.top_ids.dtype == np.int32
    assert np.array_equal(back.top_logprobs, top.astype(np.float32))


@pytest.mark.parametrize("frames", [
    [], [b"\xc1"], [msgspec.msgpack.encode({"type": "plan"})],
    [msgspec.msgpack.encode({"type": "result", "step_id": 1, "req_ids": [], "token_ids": [],
                             "forward_s": 0.0, "logprobs": ["<f4", [2], 5]})],  # frame 5 is missing
])
def test_malformed_frames_raise_decode_error(frames):
    with pytest.raises(DecodeError):
        Decoder(P.WorkerOutput).decode(frames)


def test_out_of_range_integers_are_refused_by_name():
    with pytest.raises(EncodeError, match="GenerateRequest"):
        Encoder().encode(P.GenerateRequest("x", priority=2**64))


def test_a_message_of_another_socket_is_refused():
    frames = Encoder().encode(P.AbortRequest("x"))
    with pytest.raises(DecodeError):
        Decoder(P.WorkerInput).decode(frames)
