import copy

import pytest
from transformers import AutoTokenizer

from dimoe.data.chat import ChatFormatError, Message, encode_chat
from dimoe.data.tokenizer import IMAGE, load_tokenizer, train_tokenizer
from tests.published_tokenizer import LING_TEMPLATE, ling_style_tokenizer

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


@pytest.fixture(scope="module")
def ling(tmp_path_factory):
    out = tmp_path_factory.mktemp("ling")
    ling_style_tokenizer(TEXTS * 3, out)
    return load_tokenizer(out)


def test_published_template_sets_the_boundary_for_system_and_multi_turn(ling):
    """The prompt is the template's rendering with add_generation_prompt=True, the response what the
    full rendering adds, closed by EOS (after the template's own <|role_end|>)."""
    msgs = [
        Message("system", "be brief"),
        Message("user", f"{IMAGE}\nwhat colour?"),
        Message("assistant", "red"),
        Message("user", "and the shape?"),
        Message("assistant", "circle"),
    ]
    enc = encode_chat(ling, msgs, num_image_tokens=3)
    prompt = ling.decode(enc.input_ids[: enc.prompt_length])
    assert prompt == (
        "<role>SYSTEM</role>be brief<|role_end|>"
        f"<role>HUMAN</role>{IMAGE * 3}\nwhat colour?<|role_end|><role>ASSISTANT</role>red<|role_end|>"
        "<role>HUMAN</role>and the shape?<|role_end|><role>ASSISTANT</role>"
    )
    assert ling.decode(enc.input_ids[enc.prompt_length :]) == "circle<|role_end|><|endoftext|>"
    gen = encode_chat(ling, msgs[:4], num_image_tokens=3, add_generation_prompt=True)
    assert gen.input_ids == enc.input_ids[: enc.prompt_length]
    rendered = ling.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in msgs[:4]], add_generation_prompt=True, tokenize=False
    )
    assert rendered.replace(IMAGE, IMAGE * 3) == prompt  # exactly the tokenizer's own rendering


def test_adaptation_adds_only_the_image_token_and_declares_the_existing_mask(ling):
    assert ling.mask_token == "<|mask|>" and ling.pad_token == "<|endoftext|>"
    assert ling.convert_ids_to_tokens(len(ling) - 1) == IMAGE
    assert ling.chat_template == LING_TEMPLATE and ling.padding_side == "left"


def test_own_template_renders_for_anyone_as_the_library_encodes(tok, tmp_path):
    """`apply_chat_template` on the saved tokenizer gives the ids `encode_chat` gives."""
    tok.save_pretrained(tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)
    msgs = [Message("system", "be brief"), Message("user", "what colour?"), Message("assistant", "red"),
            Message("user", "why?")]  # fmt: skip
    ids = plain.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in msgs], add_generation_prompt=True
    )
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == encode_chat(tok, msgs, add_generation_prompt=True).input_ids


def test_a_template_whose_prompt_is_not_a_prefix_is_refused(tok):
    tok = copy.deepcopy(tok)
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    with pytest.raises(ChatFormatError, match="not .*a\\s+prefix|as a\\s+prefix"):
        encode_chat(tok, [Message("user", "a"), Message("assistant", "b")])
