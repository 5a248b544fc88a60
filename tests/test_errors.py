"""A user's first mistakes with models: each ends the stage with one line naming what to change,
exit code 1, no traceback (RLHF_DEBUG=1 shows it), and nothing written.

The stage runs in this process through `process.run`, which the script's `__main__` calls (a
process start costs seconds of imports; test_make and test_faults check the one line at the
terminal); the hub-id case runs as a process, as HF_HUB_OFFLINE is read when huggingface_hub is
imported."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from pipeline import process
from pipeline.errors import ConfigError
from stages import sft
from tests import families
from tests.conftest import REPO, sft_args


def run_sft(tmp_path, model) -> str:
    """The stage as its script runs it: the error line it exits with (SystemExit's message)."""
    with pytest.raises(SystemExit) as e:
        process.run(lambda: sft.main(sft_args(tmp_path / "runs", model)))
    return e.value.code


def one_line_error(line, tmp_path) -> str:
    if isinstance(line, subprocess.CompletedProcess):  # a process: its last line on stderr
        assert line.returncode == 1 and "Traceback" not in line.stderr, line.stderr[-2000:]
        line = line.stderr.strip().splitlines()[-1]
    assert isinstance(line, str) and "\n" not in line, line
    assert (
        not (tmp_path / "runs" / "demo" / "sft").exists() and not (tmp_path / "runs" / "demo" / "sft.partial").exists()
    )
    return line


def test_a_model_path_that_does_not_exist(tmp_path):
    line = one_line_error(run_sft(tmp_path, tmp_path / "no-such-model"), tmp_path)
    assert line == (
        f"error: sft.model: '{tmp_path}/no-such-model' does not exist: set sft.model to a saved model "
        f"directory or a hub model id"
    )


def test_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    line = one_line_error(run_sft(tmp_path, tmp_path / "notes"), tmp_path)
    assert line.startswith(f"error: sft.model: '{tmp_path}/notes' is not a saved model (a directory with config.json)")


@pytest.mark.e2e
def test_a_hub_id_that_cannot_be_loaded(tmp_path):
    run = subprocess.run(
        [sys.executable, "stages/sft.py", *sft_args(tmp_path / "runs", "no-such-org/no-such-model")],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = one_line_error(run, tmp_path)
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
    assert line == (
        f"error: the tokenizer has {len(tokenizer)} tokens but the model's embeddings have 96 rows: the "
        f"tokenizer does not belong to this model (use the model's own tokenizer)"
    )


def test_rlhf_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_DEBUG", "1")
    with pytest.raises(ConfigError, match="does not exist"):  # raised as it is: Python prints its traceback
        process.run(lambda: sft.main(sft_args(tmp_path / "runs", tmp_path / "no-such-model")))
