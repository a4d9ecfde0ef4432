"""Raw formats → one conversation schema; every malformed record names its reason."""

import json

import pytest

from dimoe.data.chat import Message
from dimoe.data.formats import RecordFormatError, parse_record, parse_record_text

from .conftest import ROUND_TRIP_IMAGE, round_trip_records


def test_three_formats_parse_to_the_same_conversation():
    parsed = {name: parse_record(record) for name, record in round_trip_records().items()}
    assert [c.format for c in parsed.values()] == [
        "llava",
        "llava",
        "openai",
    ]  # an image makes ShareGPT LLaVA
    first = parsed["llava"]
    assert first.image == ROUND_TRIP_IMAGE and first.record_id == "rt" and first.split == "test"
    assert first.messages[0] == Message("user", "<image>\nWhat colour is the shape in the top left?")
    for conversation in parsed.values():
        assert conversation.messages == first.messages
        assert conversation.image == first.image
        assert conversation.messages_json() == first.messages_json()


def test_sharegpt_system_turn_and_top_level_system():
    in_turns = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4"},
        ]
    }
    top_level = {"system": "Be brief.", "conversations": in_turns["conversations"][1:]}
    a, b = parse_record(in_turns), parse_record(top_level)
    assert a.messages == b.messages and a.messages[0] == Message("system", "Be brief.")
    assert a.format == "sharegpt" and a.image is None


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"conversations": []}, "empty_conversation"),
        ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "empty_conversation"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown_role"),
        ({"messages": [{"role": "function", "content": "x"}]}, "unknown_role"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "no_response"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]}, "no_response"),
        ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]}, "bad_roles"),
        ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]}, "bad_turn"),
        ({"conversations": "not a list"}, "bad_turn"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "unsupported_content"),
        ({"messages": [], "conversations": []}, "ambiguous_format"),
        ({"image": "a.png", "images": ["b.png"], "conversations": []}, "ambiguous_format"),
        ({"images": ["a.png", "b.png"], "conversations": []}, "multiple_images"),
        ({"image": 7, "conversations": []}, "bad_image_ref"),
        (
            {
                "id": {"nested": 1},
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            },
            "bad_id",
        ),
        ({"body": "hello"}, "unknown_format"),
        ({"text": ""}, "empty_text"),
        ([1, 2], "not_an_object"),
    ],
)
def test_malformed_records_raise_with_reason(record, reason):
    with pytest.raises(RecordFormatError) as err:
        parse_record(record)
    assert err.value.reason == reason and str(err.value)


def test_openai_two_image_parts_are_refused():
    part = {"type": "image_url", "image_url": {"url": "a.png"}}
    record = {"messages": [{"role": "user", "content": [part, part]}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(RecordFormatError) as err:
        parse_record(record)
    assert err.value.reason == "multiple_images"


def test_bad_json_text():
    with pytest.raises(RecordFormatError) as err:
        parse_record_text('{"conversations": [')
    assert err.value.reason == "bad_json"
    assert parse_record_text(json.dumps(round_trip_records()["openai"])).format == "openai"
