"""Collate normalized rows into a training batch.

Layout per row: `[left padding] prompt (image tokens + text) [answer, EOS, EOS, …] [right padding]`.
Each answer is EOS-padded to `response_length` (LLaDA's SFT recipe): the padded EOS tokens are real,
supervised response tokens, which is how a model that always decodes a fixed generation length
learns to stop. The EOS padding is per row, not to the longest answer in the batch: otherwise a
one-word VQA answer batched with a 60-token description would be padded to 60 EOS tokens, and the
per-answer-length normalisation would give its one informative token a 1/60 share of the sample's
loss (and the model would spend most of its compute on EOS). Columns past a row's own response are
plain padding, outside the attention mask.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from dimoe.model.processor import ImageProcessor

MODALITIES = ("image", "prompt", "response")


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # [B, L] clean tokens
    attention_mask: torch.Tensor  # [B, L] bool, False on left padding
    prefix_mask: torch.Tensor  # [B, L] bool, image + prompt tokens
    response_mask: torch.Tensor  # [B, L] bool, answer + EOS padding
    eos_padding_mask: torch.Tensor  # [B, L] bool, the EOS padding after each answer's own EOS
    prompt_text_mask: torch.Tensor  # [B, L] bool, prompt tokens that are not image tokens
    image_mask: torch.Tensor  # [B, L] bool
    pixel_values: torch.Tensor  # [n_images, 3, S, S] for the rows that have an image, in row order
    # [B, L] long, the document of each token in rows packed with several (-1 on padding); None
    # when no row of the batch is packed
    document_ids: torch.Tensor | None = None

    @property
    def modality(self) -> torch.Tensor:
        """[B, L] long: 0 image, 1 prompt text, 2 response, -1 padding (index into MODALITIES)."""
        out = torch.full_like(self.input_ids, -1)
        out[self.image_mask] = 0
        out[self.prompt_text_mask] = 1
        out[self.response_mask] = 2
        return out

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def to(self, device: torch.device | str) -> TrainBatch:
        return TrainBatch(**{k: v.to(device) for k, v in self._tensors().items()})

    def head(self, rows: int) -> TrainBatch:
        """The first `rows` rows, with their images."""
        images = int(self.image_mask[:rows].any(dim=1).sum())
        fields = {k: v[:rows] for k, v in self._tensors().items() if k != "pixel_values"}
        return TrainBatch(**fields, pixel_values=self.pixel_values[:images])

    def repeat(self, times: int) -> TrainBatch:
        """The rows `times` over, one copy after the other (images likewise, so they keep row order)."""
        return TrainBatch(**{k: v.repeat(times, *[1] * (v.dim() - 1)) for k, v in self._tensors().items()})


def length_grouped(
    groups: Iterable[Mapping[str, np.ndarray]],
    batch_size: int,
    rng: np.random.Generator,
    bucket: int = 1,
    order_rng: np.random.Generator | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Cut each group of rows (a multiple of `batch_size`, as Ray Data yields them) into batches of
    similar length and yield those batches in random order (the `group_by_length` of HF Trainer).

    A batch is as wide as its longest row, so mixing one-word VQA answers with 60-token
    descriptions otherwise spends most of the compute on padding. Rows are ordered by their
    `bucket`-token length band and at random within a band (`rng`), so rows of nearly equal length
    but different kinds (one template per question type) still share batches. The batches' order
    comes from `order_rng` (default `rng`): data-parallel ranks given equally seeded ones take their
    k-th shortest batch at the same step, so no rank waits at the gradient all-reduce for a rank
    with a batch twice as long."""
    order_rng = order_rng or rng
    for group in groups:
        lengths = np.array([len(ids) for ids in group["input_ids"]])
        order = np.lexsort((rng.random(len(lengths)), lengths // bucket))
        batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
        for index in order_rng.permutation(len(batches)):
            yield {name: np.asarray(column)[batches[index]] for name, column in group.items()}


def _resize_image_run(
    seq: np.ndarray, prompt_length: int, image_id: int, count: int
) -> tuple[np.ndarray, int]:
    """The row with its one run of image tokens (in the prompt) made `count` long."""
    where = np.flatnonzero(seq == image_id)
    if len(where) in (0, count):
        return seq, prompt_length
    first, end = int(where[0]), int(where[-1]) + 1
    seq = np.concatenate([seq[:first], np.full(count, image_id, dtype=seq.dtype), seq[end:]])
    return seq, prompt_length + count - (end - first)


def pack_documents(rows: Sequence[tuple[int, bool]], pack_length: int) -> list[list[int]]:
    """Rows grouped for packing, in order of their first row: plain-text documents (no prompt,
    no image; `rows` gives (tokens, packable) per row) share a group while their tokens fit in
    `pack_length`, first fit in order; every other row, and a document longer than `pack_length`,
    is a group of its own. Documents are never cut: each keeps its EOS."""
    groups: list[list[int]] = []
    room: list[int] = []  # tokens still free in each group; -1 for groups that take nothing more
    for i, (tokens, packable) in enumerate(rows):
        fits = next((g for g, free in enumerate(room) if packable and tokens <= free), None)
        if fits is None:
            groups.append([i])
            room.append(pack_length - tokens if packable else -1)
        else:
            groups[fits].append(i)
            room[fits] -= tokens
    return groups


@dataclass
class _RowLayout:
    """One output row: its prompt, its answer tokens, the columns its response takes (the answer
    EOS-padded to `response_length`; a packed row's documents, unpadded), and the tokens of each
    of its documents (one document: the whole row)."""

    prompt: np.ndarray
    answer: np.ndarray
    window: int
    documents: list[int]


def _row_layout(sequences: list[np.ndarray], prompt_length: int, response_length: int) -> _RowLayout:
    """The layout of one row, or of several plain-text documents packed into one (no prompt)."""
    if len(sequences) > 1:
        answer = np.concatenate(sequences)
        return _RowLayout(sequences[0][:0], answer, len(answer), [len(s) for s in sequences])
    prompt, answer = sequences[0][:prompt_length], sequences[0][prompt_length:]
    window = max(response_length, len(answer))
    return _RowLayout(prompt, answer, window, [prompt_length + window])


def _fill_rows(
    rows: list[_RowLayout], pad_id: int, eos_id: int, length_quantum: int
) -> tuple[torch.Tensor, ...]:
    """ids, attention, prefix, EOS-padding and document-id tensors [B, L] of the rows, left-padded
    so that every response starts at the same column (and to a multiple of `length_quantum`)."""
    response = max(row.window for row in rows)
    length = -(-(max(len(row.prompt) for row in rows) + response) // length_quantum) * length_quantum
    b = len(rows)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention, prefix, eos_padding = (torch.zeros(b, length, dtype=torch.bool) for _ in range(3))
    documents = torch.full((b, length), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        start = length - response - len(row.prompt)
        answer_end, end = start + len(row.prompt) + len(row.answer), start + len(row.prompt) + row.window
        ids[i, start:answer_end] = torch.from_numpy(np.concatenate([row.prompt, row.answer]))
        ids[i, answer_end:end] = eos_id
        eos_padding[i, answer_end:end] = True
        attention[i, start:end] = True
        prefix[i, start : start + len(row.prompt)] = True
        counts = torch.tensor(row.documents)
        documents[i, start:end] = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return ids, attention, prefix, eos_padding, documents


def collate(
    rows: Mapping[str, Sequence[Any]],
    *,
    pad_id: int,
    eos_id: int,
    image_id: int,
    response_length: int,
    processor: ImageProcessor | None,
    image_tokens: int | None = None,
    length_quantum: int = 1,
    pack_length: int = 0,
) -> TrainBatch:
    """`rows` is a column batch as Ray Data yields it (`input_ids`, `prompt_length`, `image`).
    `image_tokens`: the model's image-token count, when it may differ from the count the data was
    normalized with (a tower trained at another resolution); each row's image tokens are resized.
    `length_quantum`: the batch is left-padded to a multiple of it (quantized effective length).
    `pack_length`: plain-text documents are packed into rows of up to this many tokens
    (`pack_documents`, with `document_ids`; each document without EOS padding); 0: off."""
    # np.array copies: Ray Data hands out read-only arrays, which torch.from_numpy warns about.
    sequences = [np.array(ids, dtype=np.int64) for ids in rows["input_ids"]]
    prompt_lengths = [int(n) for n in rows["prompt_length"]]
    blobs = list(rows.get("image", [None] * len(sequences)))
    if image_tokens is not None:
        pairs = zip(sequences, prompt_lengths, strict=True)
        resized = [_resize_image_run(seq, p, image_id, image_tokens) for seq, p in pairs]
        sequences, prompt_lengths = [seq for seq, _ in resized], [p for _, p in resized]
    packable = [
        (len(s), p == 0 and b is None) for s, p, b in zip(sequences, prompt_lengths, blobs, strict=True)
    ]
    groups = pack_documents(packable, pack_length) if pack_length else [[i] for i in range(len(sequences))]
    layout = [_row_layout([sequences[i] for i in g], prompt_lengths[g[0]], response_length) for g in groups]
    ids, attention, prefix, eos_padding, documents = _fill_rows(layout, pad_id, eos_id, length_quantum)
    image_mask = ids == image_id
    images = [Image.open(io.BytesIO(blobs[g[0]])) for g in groups if blobs[g[0]] is not None]
    if images and processor is None:
        raise ValueError("the batch has images but the model has no vision tower")
    pixels = processor(images) if processor is not None else torch.zeros(0)
    packed = documents if any(len(row.documents) > 1 for row in layout) else None
    return TrainBatch(
        ids,
        attention,
        prefix,
        attention & ~prefix,
        eos_padding,
        prefix & ~image_mask,
        image_mask,
        pixels,
        packed,
    )
