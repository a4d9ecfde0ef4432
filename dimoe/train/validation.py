"""Validation during training (docs/design.md §4): a held-out split of the stage's blend, and the
held-out scores every `validation.every_steps`: the diffusion loss at a fixed t grid with fixed
masks (`objective.heldout_loss`), and optionally the exact match of a quick greedy decode.

The split is a hash of each row's `origin` (its source row; the row's tokens and image when the
blend has no origin), so a row drawn into a blend twice is held out or trained on as a whole, and
the same blend always splits the same way whatever the number of workers.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from dimoe.config.train import TrainConfig
from dimoe.train.batch import TrainBatch
from dimoe.train.objective import heldout_loss
from dimoe.train.schedule import final_block_size, model_block_size

DATASET = "validation"  # the Ray Train dataset of the held-out rows (not split between workers)


def row_key(row: dict[str, Any]) -> bytes:
    if row.get("origin") is not None:
        return str(row["origin"]).encode()
    return np.asarray(row["input_ids"], dtype=np.int64).tobytes() + bytes(row.get("image") or b"")


def is_heldout(row: dict[str, Any], fraction: float) -> bool:
    return zlib.crc32(row_key(row)) / 2**32 < fraction


def split_blend(dataset: Any, fraction: float, columns: list[str]) -> tuple[Any, Any]:
    """(training rows, held-out rows) of a Ray Dataset, both with `columns` only. Filtered as
    Arrow batches: a row-wise filter goes through pandas, which turns a null image into NaN."""

    def side(heldout: bool) -> Any:
        def keep(batch: pa.Table) -> pa.Table:
            mask = [is_heldout(row, fraction) is heldout for row in batch.to_pylist()]
            return batch.filter(pa.array(mask, type=pa.bool_())).select(columns)

        return dataset.map_batches(keep, batch_format="pyarrow")

    return side(False), side(True)


class Validator:
    """A worker's held-out rows (every worker holds all of them: the scores are the same on every
    rank, and a forward under ZeRO-3 is collective) and their scores."""

    def __init__(self, cfg: TrainConfig, shard: Any, to_batch: Callable[[dict], TrainBatch]) -> None:
        spec = cfg.validation
        self.cfg, self.every = cfg, spec.every_steps
        rows = next(iter(shard.iter_batches(batch_size=spec.max_rows, batch_format="numpy")))
        count = len(rows["input_ids"])
        chunks = range(0, count, cfg.batch_size)
        self.batches = [to_batch({k: v[i : i + cfg.batch_size] for k, v in rows.items()}) for i in chunks]
        self.rows = count

    def due(self, step: int) -> bool:
        """Whether the step about to run (0-based) ends with a validation."""
        return (step + 1) % self.every == 0 or step + 1 == self.cfg.max_steps

    def scores(self, model: torch.nn.Module, *, mask_token_id: int, eos_token_id: int) -> dict[str, float]:
        """`val_loss` (row-weighted over the chunks) and, with `decode_rows`, `val_exact_match`."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if self.cfg.objective == "ar":  # the next-token loss of the held-out rows
            return {"val_loss": self.ar_loss(model, base)}
        block_size = model_block_size(final_block_size(self.cfg), base.config.attention)
        losses = [
            heldout_loss(
                model, self.cfg, batch, mask_token_id=mask_token_id, encode_images=base.encode_images,
                seed=self.cfg.seed + i, block_size=block_size,
            ) * batch.input_ids.shape[0]
            for i, batch in enumerate(self.batches)
        ]  # fmt: skip
        scores = {"val_loss": sum(losses) / self.rows}
        if self.cfg.validation.decode_rows:
            scores["val_exact_match"] = self.exact_match(base, eos_token_id)
        return scores

    @torch.no_grad()
    def ar_loss(self, model: torch.nn.Module, base: torch.nn.Module) -> float:
        from dimoe.train.objective import ar_training_step

        was_training = model.training
        model.eval()
        losses = [
            ar_training_step(model, self.cfg, batch, encode_images=base.encode_images).metrics["loss_ar"]
            * batch.input_ids.shape[0]
            for batch in self.batches
        ]
        model.train(was_training)
        return sum(losses) / self.rows

    @torch.no_grad()
    def exact_match(self, model: torch.nn.Module, eos_token_id: int) -> float:
        """Share of the first `decode_rows` held-out rows whose greedy decode (`llada`, one block
        of the response length, `decode_steps` steps) equals the answer up to its EOS."""
        hits = total = 0
        was_training = model.training
        model.eval()
        for chunk in self.batches:
            if total >= self.cfg.validation.decode_rows:
                break
            batch = chunk.head(self.cfg.validation.decode_rows - total)
            hits += self._decode_hits(model, batch, eos_token_id)
            total += batch.input_ids.shape[0]
        model.train(was_training)
        return hits / max(total, 1)

    def _decode_hits(self, model: torch.nn.Module, batch: TrainBatch, eos_token_id: int) -> int:
        from dimoe.config.infer import DecodeSettings
        from dimoe.infer.engine import PromptBatch, generate

        # collate left-pads the prompts, so every response starts at the same column
        response = int(batch.response_mask.sum(dim=1).max())
        prompt = slice(0, batch.input_ids.shape[1] - response)
        pixels = batch.pixel_values if batch.pixel_values.numel() else None
        prompts = PromptBatch(batch.input_ids[:, prompt], batch.attention_mask[:, prompt].long(), pixels)
        # a `block` model decodes whole blocks of its own size, each in at least one step
        block = model.config.block_size if model.config.attention == "block" else response
        gen = -(-response // block) * block
        steps = -(-max(self.cfg.validation.decode_steps, gen // block) // (gen // block)) * (gen // block)
        settings = DecodeSettings(
            strategy="llada",
            steps=steps,
            gen_length=gen,
            block_length=block,
            cache="none",
            seed=self.cfg.seed,
        )
        out = generate(model, prompts, settings).output_ids
        answers = batch.input_ids[:, prompt.stop :]
        return sum(
            _until(a, eos_token_id) == _until(o, eos_token_id) for a, o in zip(answers, out, strict=True)
        )


def _until(tokens: torch.Tensor, eos_id: int) -> list[int]:
    ids = tokens.tolist()
    return ids[: ids.index(eos_id)] if eos_id in ids else ids
