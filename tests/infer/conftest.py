"""Tiny DiMoE-VL models and a tokenizer for the inference tests (built once per session)."""

import pytest
import torch
from PIL import Image

from dimoe.config.infer import InferConfig
from dimoe.infer.engine import GenerationEngine
from dimoe.infer.inputs import Request
from dimoe.model.build import build_model


def make_model(small_spec, tokenizer, attention: str, vision: bool):
    spec = small_spec.model_copy(
        update={"attention": attention, "vision": small_spec.vision if vision else None}
    )
    model = build_model(spec, tokenizer, seed=0).eval()
    with torch.no_grad():
        # A random model's softmax is nearly uniform; sharpen it so that confidences spread over
        # (0, 1) and the threshold strategy reveals several tokens in some steps.
        model.lm_head.weight.mul_(40.0)
    return model


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a small shared machine (2 cores in CI)
    they oversubscribe the CPU and make every forward an order of magnitude slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def prefix_model(small_spec, tokenizer):
    """Trained-with-prefix-mask layout (cacheable), with a vision tower."""
    return make_model(small_spec, tokenizer, "prefix", vision=True)


@pytest.fixture(scope="session")
def full_model(small_spec, tokenizer):
    """Full attention, text only."""
    return make_model(small_spec, tokenizer, "full", vision=False)


@pytest.fixture(scope="session")
def engine(prefix_model, tokenizer):
    config = InferConfig.model_validate(
        {
            "presets": {"fast": {"steps": 8, "gen_length": 32, "block_length": 16, "threshold": 0.6}},
            "default_preset": "fast",
        }
    )
    return GenerationEngine(prefix_model, tokenizer, config)


@pytest.fixture
def requests_mixed() -> list[Request]:
    """Prompts of different lengths, one with an image, one multi-turn in OpenAI messages."""
    return [
        Request("short", prompt="Hi"),
        Request("long", prompt="There is a red circle at the left of the image. What is 12 plus 5? " * 3),
        Request(
            "image", prompt="What colour is the square?", image=Image.new("RGB", (48, 40), (200, 30, 30))
        ),
        Request(
            "chat",
            messages=[
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is 3 plus 4?"},
                {"role": "assistant", "content": "The answer is 7."},
                {"role": "user", "content": [{"type": "text", "text": "And 5 plus 1?"}]},
            ],
        ),
    ]
