"""A saved checkpoint is self-contained: `auto_map` and the modeling, configuration and processor
code beside the weights, loadable with `trust_remote_code=True` where dimoe is not importable."""

import json
import os
import subprocess
import sys

import torch
from PIL import Image

from dimoe.data.chat import Message, encode_chat
from dimoe.model.build import load_checkpoint
from dimoe.model.processor import ImageProcessor

# Runs in a fresh interpreter where `import dimoe` raises: only torch, transformers and pillow.
REMOTE = """
import sys, json, torch
sys.modules["dimoe"] = None
try:
    import dimoe
    raise SystemExit("dimoe is importable: the test would prove nothing")
except ImportError:
    pass
from PIL import Image
from transformers import AutoModel, AutoProcessor, AutoTokenizer
ckpt, out = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(ckpt, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=True)
messages = [{"role": "user", "content": "<image>\\nWhat colour is the shape?"}]
text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(images=[Image.new("RGB", (48, 48), (200, 30, 30))], text=text)
with torch.no_grad():
    logits = model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]).logits
torch.save({"ids": inputs["input_ids"], "logits": logits, "module": type(model).__module__,
            "mask": tokenizer.mask_token_id}, out)
"""


def test_checkpoint_loads_with_trust_remote_code_where_dimoe_does_not_import(checkpoint, tmp_path):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "config.DiMoEConfig", "AutoModel": "modeling.DiMoEVLModel"}
    for name in ("modeling.py", "config.py", "attention.py", "moe.py", "vision.py", "processor.py"):
        assert (checkpoint / name).is_file(), name
    out = tmp_path / "remote.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_MODULES_CACHE": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", REMOTE, str(checkpoint), str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    remote = torch.load(out)
    assert remote["module"].startswith("transformers_modules.")  # the shipped copy, not dimoe's

    model, tokenizer = load_checkpoint(checkpoint)
    image = Image.new("RGB", (48, 48), (200, 30, 30))
    encoded = encode_chat(
        tokenizer,
        [Message("user", "<image>\nWhat colour is the shape?")],
        num_image_tokens=model.config.num_image_tokens,
        add_generation_prompt=True,
    )
    assert remote["ids"][0].tolist() == encoded.input_ids and remote["mask"] == tokenizer.mask_token_id
    with torch.no_grad():
        pixels = ImageProcessor(model.config.image_size)([image])
        logits = model(torch.tensor([encoded.input_ids]), None, pixels).logits
    torch.testing.assert_close(remote["logits"], logits, rtol=1e-5, atol=1e-5)


def test_generation_and_processor_configs_hold_the_decoding_defaults(checkpoint):
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    model_config = json.loads((checkpoint / "config.json").read_text())
    assert generation["mask_token_id"] == model_config["mask_token_id"]
    assert {k: generation[k] for k in ("strategy", "steps", "gen_length", "block_length", "threshold")} == {
        "strategy": "threshold",
        "steps": 16,
        "gen_length": 64,
        "block_length": 32,
        "threshold": 0.9,
    }  # fmt: skip  (configs/infer/default.yaml's default preset, mid)
    processor = json.loads((checkpoint / "processor_config.json").read_text())
    assert processor["num_image_tokens"] == model_config["num_image_tokens"]
    preprocessor = json.loads((checkpoint / "preprocessor_config.json").read_text())
    size = model_config["vision_config"]["image_size"]
    assert preprocessor["size"] == {"height": size, "width": size}
