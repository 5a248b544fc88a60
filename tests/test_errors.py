"""A user's first mistakes with models: each ends the stage with one line naming what to change,
exit code 1, no traceback (RLHF_DEBUG=1 shows it), and nothing written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


from tests import families
from tests.conftest import REPO, sft_args


def run_sft(tmp_path, model, debug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"RLHF_DEBUG": "1"} if debug else {})}
    return subprocess.run([sys.executable, "stages/sft.py", *sft_args(tmp_path / "runs", model)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line_error(run: subprocess.CompletedProcess, tmp_path) -> str:
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "runs" / "demo" / "sft").exists() and not (tmp_path / "runs" / "demo" / "sft.partial").exists()
    return run.stderr.strip().splitlines()[-1]


def test_a_model_path_that_does_not_exist(tmp_path):
    line = one_line_error(run_sft(tmp_path, tmp_path / "no-such-model"), tmp_path)
    assert line == (f"error: sft.model: '{tmp_path}/no-such-model' does not exist: set sft.model to a saved model "
                    f"directory or a hub model id")


def test_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    line = one_line_error(run_sft(tmp_path, tmp_path / "notes"), tmp_path)
    assert line.startswith(f"error: sft.model: '{tmp_path}/notes' is not a saved model (a directory with config.json)")


def test_a_hub_id_that_cannot_be_loaded(tmp_path):
    line = one_line_error(run_sft(tmp_path, "no-such-org/no-such-model"), tmp_path)
    assert line.startswith("error: no tokenizer could be loaded from 'no-such-org/no-such-model' (")


def test_a_tokenizer_that_does_not_belong_to_the_model(tmp_path, base_model):
    """The demo model (96-token vocabulary) with a ByteLevel tokenizer of another family beside it."""
    mixed = tmp_path / "mixed"
    shutil.copytree(base_model, mixed)
    for f in mixed.glob("tokenizer*"):
        f.unlink()
    tokenizer = families.chatml_tokenizer()
    tokenizer.save_pretrained(mixed)
    line = one_line_error(run_sft(tmp_path, mixed), tmp_path)
    assert line == (f"error: the tokenizer has {len(tokenizer)} tokens but the model's embeddings have 96 rows: the "
                    f"tokenizer does not belong to this model (use the model's own tokenizer)")


def test_rlhf_debug_shows_the_traceback(tmp_path):
    run = run_sft(tmp_path, tmp_path / "no-such-model", debug=True)
    assert run.returncode == 1 and "Traceback" in run.stderr and "ConfigError" in run.stderr
