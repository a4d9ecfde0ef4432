"""Packed rows (`data.pack_length`): plain-text documents packed first-fit into rows, chat rows left
alone; in a packed row every document gets the logits it gets alone in its own row, under each
attention type and in the block-diffusion and whole-response training layouts, and the AR loss
never predicts one document's first token from the one before it."""

import pytest
import torch

from dimoe.config.train import TrainConfig
from dimoe.data.chat import Message, encode_chat, encode_plain_text
from dimoe.model.build import build_model
from dimoe.train.batch import collate, pack_documents
from dimoe.train.objective import ar_training_step, block_layout, whole_response_layout

TEXTS = ["the red square is left of the green circle", "a blue star", "two yellow hearts at the top right"]


def batch_of(tokenizer, rows, pack_length):
    columns = {"input_ids": [ids for ids, _ in rows], "prompt_length": [p for _, p in rows]}
    return collate(columns, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                   image_id=tokenizer.convert_tokens_to_ids("<image>"), response_length=8, processor=None,
                   pack_length=pack_length)  # fmt: skip


def documents(tokenizer):
    return [(encode_plain_text(tokenizer, text).input_ids, 0) for text in TEXTS]


def test_pack_documents_first_fit_in_order():
    rows = [(5, True), (4, True), (3, False), (6, True), (2, True), (12, True)]
    # 5+4 fill the first row; the chat row stays alone; 6 does not fit the 1 token left, 2 joins it;
    # 12 is longer than a row and is not cut
    assert pack_documents(rows, 10) == [[0, 1], [2], [3, 4], [5]]


def test_collate_packs_plain_text_and_leaves_chat_rows(tokenizer):
    docs = documents(tokenizer)
    chat = encode_chat(tokenizer, [Message("user", "Name the colour."), Message("assistant", "red")])
    batch = batch_of(tokenizer, [docs[0], (chat.input_ids, chat.prompt_length), docs[1]], pack_length=64)
    first, second = len(docs[0][0]), len(docs[1][0])
    packed = batch.document_ids[0][batch.attention_mask[0]]
    assert packed.tolist() == [0] * first + [1] * second
    assert batch.input_ids[0, -(first + second) :].tolist() == docs[0][0] + docs[1][0]
    assert not batch.eos_padding_mask[0].any() and not batch.prefix_mask[0].any()  # all of it is response
    chat_row = batch.attention_mask[1]
    assert (batch.document_ids[1][chat_row] == 0).all() and (batch.document_ids[1][~chat_row] == -1).all()
    assert int(batch.prefix_mask[1].sum()) == chat.prompt_length and batch.eos_padding_mask[1].any()
    unpacked = batch_of(tokenizer, docs, pack_length=0)
    assert unpacked.document_ids is None and len(unpacked.input_ids) == 3


def columns_of(batch, row):
    """The columns of each document of a packed `row`, in order."""
    ids = batch.document_ids[row]
    return [torch.nonzero(ids == d).flatten() for d in range(int(ids.max()) + 1)]


@pytest.mark.parametrize("attention", ["full", "prefix", "causal", "block"])
def test_packed_row_logits_equal_each_document_alone(tiny_spec, tokenizer, attention):
    """A batch of the packed documents (left-padded) and a longer chat row (right-padded): every
    document and the chat row get the logits they get alone."""
    spec = tiny_spec.model_copy(update={"attention": attention, "block_size": 4, "vision": None})
    model = build_model(spec, tokenizer, seed=0).eval()
    question = "What is 12 plus 5? There is a red circle at the left of the image, and a blue star."
    chat = encode_chat(tokenizer, [Message("user", question), Message("assistant", "The answer is 17.")])
    rows = [*documents(tokenizer), (chat.input_ids, chat.prompt_length)]
    packed, alone = batch_of(tokenizer, rows, pack_length=64), batch_of(tokenizer, rows, pack_length=0)
    assert len(packed.input_ids) == 2 and (packed.document_ids[0] == -1).any()
    with torch.no_grad():
        got = model(packed.input_ids, packed.attention_mask.long(), prefix_mask=packed.prefix_mask,
                    document_ids=packed.document_ids).logits  # fmt: skip
        assert not got.isnan().any()
        pieces = [(0, columns) for columns in columns_of(packed, 0)]
        pieces.append((1, torch.nonzero(packed.attention_mask[1]).flatten()))
        for i, (row, columns) in enumerate(pieces):
            own = alone.attention_mask[i]
            want = model(
                alone.input_ids[i : i + 1, own], prefix_mask=alone.prefix_mask[i : i + 1, own]
            ).logits[0]
            torch.testing.assert_close(got[row, columns], want[: len(columns)], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block_size", [4, None])  # block diffusion; the whole response (WSD's stable phase)
def test_packed_training_layouts_equal_each_document_alone(tiny_spec, tokenizer, block_size):
    spec = tiny_spec.model_copy(update={"attention": "block", "block_size": 4, "vision": None})
    model = build_model(spec, tokenizer, seed=0).eval()
    docs = documents(tokenizer)
    packed = batch_of(tokenizer, docs, pack_length=64)
    noisy = packed.input_ids.clone()
    noisy[:, 1::3] = model.config.mask_token_id  # a fixed noise pattern over the packed row
    noisy[~packed.attention_mask] = tokenizer.pad_token_id

    def logits(ids, clean, real, prefix, document_ids=None):
        if block_size is None:
            positions, mask = whole_response_layout(real, prefix, document_ids)
            return model(ids, real.long(), position_ids=positions, layout_mask=mask).logits
        layout, layout_real, positions, mask = block_layout(
            ids, clean, real, prefix, block_size, document_ids
        )
        return model(layout, layout_real.long(), position_ids=positions, layout_mask=mask,
                     logits_positions=slice(0, ids.shape[1])).logits  # fmt: skip

    with torch.no_grad():
        response = int(packed.response_mask.sum())
        got = logits(noisy, packed.input_ids[:, -response:], packed.attention_mask, packed.prefix_mask,
                     packed.document_ids)[0]  # fmt: skip
        for columns in columns_of(packed, 0):
            ids, clean = noisy[:, columns], packed.input_ids[:, columns]
            real, prefix = torch.ones_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool)
            torch.testing.assert_close(
                got[columns], logits(ids, clean, real, prefix)[0], rtol=1e-4, atol=1e-5
            )


def test_ar_loss_of_a_packed_row_skips_document_boundaries(tiny_spec, tokenizer):
    spec = tiny_spec.model_copy(update={"attention": "causal", "vision": None})
    model = build_model(spec, tokenizer, seed=0).eval()
    docs = documents(tokenizer)
    packed = batch_of(tokenizer, docs, pack_length=64)
    with torch.no_grad():
        got = ar_training_step(model, TrainConfig(stage="s"), packed, encode_images=model.encode_images)
        total, count = 0.0, 0
        for ids, _ in docs:  # each document alone: every token predicts the next one of its own
            logits = model(torch.tensor([ids])).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
            count += len(ids) - 1
    assert got.metrics["masked_tokens"] == count
    assert got.metrics["loss_ar"] == pytest.approx(total / count, rel=1e-5)
