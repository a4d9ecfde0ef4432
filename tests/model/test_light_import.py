"""`import dimoe` stays light, and the model still registers with `transformers` where it is used.

Both checks run in a fresh interpreter: this test process has long imported torch.
"""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import dimoe.config
from dimoe.model.build import save_checkpoint

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "ray")
LIGHT_MODULES = ["dimoe", "dimoe.cli"] + [
    f"dimoe.config.{m.name}" for m in pkgutil.iter_modules(dimoe.config.__path__)
]


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_package_cli_and_config_schemas_import_no_heavy_modules():
    assert {"dimoe.config.model", "dimoe.config.train", "dimoe.config.tune"} <= set(LIGHT_MODULES)
    imports = "; ".join(f"import {m}" for m in LIGHT_MODULES)
    code = f"import json, sys; {imports}; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    assert json.loads(run_python(code)) == []


def test_fresh_process_loads_a_checkpoint_through_the_library_and_automodel(tiny_model, tokenizer, tmp_path):
    save_checkpoint(tiny_model, tokenizer, tmp_path / "ckpt")
    checksum = float(sum(p.detach().double().sum() for p in tiny_model.parameters()))
    code = f"""
import json
from transformers import AutoModel
from dimoe.model.build import load_checkpoint

model, _ = load_checkpoint({str(tmp_path / "ckpt")!r})
auto = AutoModel.from_pretrained({str(tmp_path / "ckpt")!r})
checksum = float(sum(p.detach().double().sum() for p in auto.parameters()))
print(json.dumps([type(model).__name__, type(auto).__name__, checksum]))
"""
    library, auto, loaded_checksum = json.loads(run_python(code))
    assert library == auto == "DiMoEVLModel"
    assert loaded_checksum == checksum  # same weights, summed in the same order
