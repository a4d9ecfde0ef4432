from pathlib import Path

import pytest
import torch

from dimoe.config.loader import load_config
from dimoe.config.model import ModelConfig
from dimoe.data.tokenizer import train_tokenizer
from dimoe.model.build import build_model, save_checkpoint

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]


def corpus() -> list[str]:
    lines = []
    for i in range(300):
        c, s = COLOURS[i % 4], SHAPES[i % 3]
        lines.append(f"There is a {c} {s} at the {'left' if i % 2 else 'right'} of the image.")
        lines.append(f"What is {i} plus {i % 7}? The answer is {i + i % 7}.")
    return lines


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return train_tokenizer(corpus(), 400, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_spec() -> ModelConfig:
    return load_config("configs/model/tiny.yaml", ModelConfig)


@pytest.fixture(scope="session")
def small_spec(tiny_spec) -> ModelConfig:
    """Smaller than configs/model/tiny.yaml, for tests that run many decoding forwards."""
    vision = tiny_spec.vision.model_copy(
        update={
            "image_size": 32,
            "patch_size": 8,
            "pool_2x2": True,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
        }
    )
    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_experts": 4}
    return tiny_spec.model_copy(update={**small, "moe_intermediate_size": 64, "vision": vision})


@pytest.fixture(scope="session")
def checkpoint(small_spec, tokenizer, tmp_path_factory) -> Path:
    """The one saved checkpoint of the suite: `small_spec` (prefix attention, a vision tower), seed 0.
    Tests that load a model from disk (eval, inference runs, serving, the packaged wheel) share it."""
    model = build_model(small_spec, tokenizer, seed=0)
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture
def tiny_model(tiny_spec, tokenizer):
    torch.manual_seed(0)
    return build_model(tiny_spec, tokenizer).eval()


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session (small object store).

    Four logical CPUs on a 2-core machine: the suite's Serve replicas, 2 training workers and the
    Ray Data tasks that stream a blend must all be schedulable at once, or training waits forever
    for data (a CPU-reservation deadlock, not a speed question)."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(num_cpus=4, object_store_memory=512 * 2**20, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
