"""The decoder's work, without Ray: check a job, decode a batch of jobs, stream one job.

`dimoe.serving.decoder_deployment` wraps this in a Serve deployment (batching, metrics); keeping
the engine calls here makes them testable without a cluster.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from dimoe.config.infer import DecodeSettings, InferConfig
from dimoe.infer.engine import GenerationEngine
from dimoe.infer.inputs import Result
from dimoe.model.params import count_parameters
from dimoe.serving.errors import bad_request, internal_error
from dimoe.serving.jobs import Completion, DecodeJob, DecodeOutcome, StreamEvent, fit_settings


@dataclass
class PreparedJob:
    """A job whose settings are resolved and whose prompt is known to fit."""

    job: DecodeJob
    settings: DecodeSettings
    received_at: float = field(default_factory=time.monotonic)


class DecoderCore:
    """A GenerationEngine serving decode jobs; the model's active parameters are counted once for
    the NFE × active-parameters figure of every completion."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine
        self.active_params_b = count_parameters(engine.model).active_b

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: InferConfig, device: str = "cpu") -> DecoderCore:
        return cls(GenerationEngine.from_checkpoint(path, config, device=device))

    @property
    def context_length(self) -> int:
        return self.engine.model.config.max_position_embeddings

    def prepare(self, job: DecodeJob) -> PreparedJob:
        """Resolve the settings and check the prompt (chat-encode it) before the job joins a batch:
        a bad request is then refused alone instead of failing the engine call of the whole batch.
        RequestRejected if unusable."""
        settings = fit_settings(self.engine.config, job.preset, job.overrides)
        try:
            encoded = self.engine.encode(0, job.request, settings)
        except ValueError as exc:
            raise bad_request(
                str(exc), "messages" if job.request.messages else "prompt", "invalid_prompt"
            ) from None
        # Keep the decoded image: the engine call would otherwise decode the bytes again.
        request = replace(job.request, image=encoded.image)
        return PreparedJob(replace(job, request=request), settings)

    def run(self, jobs: list[PreparedJob]) -> list[DecodeOutcome]:
        """Decode `jobs`, one engine call per distinct settings (a batch shares one schedule);
        outcomes in job order. A failing call fails its own group only."""
        groups: dict[str, list[int]] = {}
        for i, prepared in enumerate(jobs):
            groups.setdefault(prepared.settings.model_dump_json(), []).append(i)
        outcomes: list[DecodeOutcome] = [DecodeOutcome()] * len(jobs)
        for members in groups.values():
            settings = jobs[members[0]].settings
            requests = [jobs[i].job.request for i in members]
            try:
                results = self.engine.generate(requests, batch_size=len(requests), **settings.model_dump())
            except Exception as exc:  # a server fault: report it to these callers, keep serving others
                error = internal_error(f"decoding failed: {type(exc).__name__}: {exc}")
                for i in members:
                    outcomes[i] = DecodeOutcome(error=error)
                continue
            for i, result in zip(members, results, strict=True):
                outcomes[i] = DecodeOutcome(self.completion(result, settings))
        return outcomes

    def stream(self, prepared: PreparedJob) -> Iterator[StreamEvent]:
        """Decode one job alone, yielding the text each block commits; the last event carries the
        completion."""
        settings = prepared.settings
        chunks = self.engine.generate_stream([prepared.job.request], batch_size=1, **settings.model_dump())
        previous = ""
        try:
            for chunk in chunks:
                # Committed blocks never change, so the text only grows; the fallback covers a
                # tokenizer whose decoding of a longer sequence does not extend the shorter one's.
                delta = chunk.text[len(previous) :] if chunk.text.startswith(previous) else chunk.text
                previous = chunk.text
                completion = self.completion(chunk.result, settings) if chunk.done else None
                yield StreamEvent(chunk.block, delta, completion)
        except Exception as exc:  # a server fault mid-stream: end this stream with it
            yield StreamEvent(error=internal_error(f"decoding failed: {type(exc).__name__}: {exc}"))

    def completion(self, result: Result, settings: DecodeSettings) -> Completion:
        generated = len(result.output_ids)
        return Completion(
            id=result.id,
            text=result.output,
            finish_reason=result.finish_reason,
            prompt_tokens=len(result.prompt_ids),
            completion_tokens=generated,
            nfe=result.nfe,
            latency_s=result.latency_s,
            nfe_x_active_params_b=result.nfe * self.active_params_b,
            strategy=settings.strategy,
            logprobs=result.logprobs,
        )
