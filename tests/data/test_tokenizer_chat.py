import pytest
from transformers import AutoTokenizer

from dimoe.data.chat import ChatFormatError, Message, encode_chat
from dimoe.data.tokenizer import IMAGE, load_tokenizer, train_tokenizer

TEXTS = [
    f"the {c} shape number {i} is at the {p}"
    for i in range(50)
    for c in ("red", "blue")
    for p in ("left", "top")
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, 320, out)
    return load_tokenizer(out)


def test_saved_tokenizer_loads_with_autotokenizer_and_round_trips(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto.mask_token == "<|mask|>" and auto.mask_token_id == tok.mask_token_id
    text = "the red shape number 7 is at the left, then ünïcode!"
    ids = auto.encode(text, add_special_tokens=False)
    assert auto.decode(ids) == text
    assert auto.convert_tokens_to_ids(IMAGE) == 3 and auto.pad_token_id == 0 and auto.eos_token_id == 1


def test_too_small_vocab_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(TEXTS, 100, tmp_path)


def test_chat_boundary_is_where_the_response_starts(tok):
    msgs = [
        Message("system", "be brief"),
        Message("user", f"{IMAGE}\nwhat colour?"),
        Message("assistant", "red"),
    ]
    enc = encode_chat(tok, msgs, num_image_tokens=4)
    prompt = enc.input_ids[: enc.prompt_length]
    assert prompt[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert prompt.count(tok.convert_tokens_to_ids(IMAGE)) == 4
    response = enc.input_ids[enc.prompt_length :]
    assert tok.decode(response[:-1]) == "red" and response[-1] == tok.eos_token_id
    assert enc.answer_length == len(response) and enc.num_image_tokens == 4
    gen = encode_chat(tok, msgs[:2], num_image_tokens=4, add_generation_prompt=True)
    assert gen.input_ids == prompt  # the generation prompt is exactly the training prompt


def test_image_without_placeholder_goes_before_first_user_turn(tok):
    enc = encode_chat(tok, [Message("user", "what?"), Message("assistant", "red")], num_image_tokens=2)
    image_id = tok.convert_tokens_to_ids(IMAGE)
    assert enc.input_ids[1:3] == [image_id, image_id]


@pytest.mark.parametrize(
    "messages,match",
    [
        ([], "empty conversation"),
        ([Message("assistant", "hi")], "first non-system turn"),
        ([Message("user", "a"), Message("user", "b")], "in a row"),
        ([Message("user", "a")], "no response"),
        ([Message("user", "a"), Message("assistant", "  ")], "no response"),
        ([Message("user", f"{IMAGE}{IMAGE}a"), Message("assistant", "b")], "at most one image"),
    ],
)
def test_malformed_conversations_are_named(tok, messages, match):
    with pytest.raises(ChatFormatError, match=match):
        encode_chat(tok, messages, num_image_tokens=2)
