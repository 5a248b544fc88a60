import json

import pytest

from pipeline import artifacts
from pipeline.errors import MissingArtifact, RecipeChanged


def test_commit_swaps_in_a_complete_directory_and_keeps_the_old_one_until_then(tmp_path):
    stage = artifacts.StageDir(tmp_path, "sft")
    out = stage.begin("fp1")
    (out / "weights").write_text("v1")
    assert not stage.is_current("fp1")  # nothing complete yet
    stage.commit("fp1", {"a": 1}, {"data": "x"}, {"loss": 1.0}, started=0)
    assert stage.is_current("fp1") and not stage.partial.exists()
    manifest = artifacts.require(stage.final, "sft")
    assert manifest["stage"] == "sft" and manifest["metrics"] == {"loss": 1.0}
    assert manifest["versions"]["torch"] and manifest["inputs"] == {"data": "x"}

    out = stage.begin("fp2")  # a re-run in progress: the old artifact is untouched
    (out / "weights").write_text("half-written")
    assert (stage.final / "weights").read_text() == "v1" and stage.is_current("fp1")
    stage.commit("fp2", {}, {}, {}, started=0)
    assert (stage.final / "weights").read_text() == "half-written" and stage.is_current("fp2")


def record(**ppo) -> dict:
    return {
        "config": {
            "ppo": {
                "learning_rate": 1e-5,
                "save_every": 8,
                "rewards": [{"function": "f.py:f", "timeout_s": None}],
                **ppo,
            }
        },
        "inputs": {"ppo.rewards:f": {"function": "f.py:f", "fingerprint": "a"}},
    }


SAFE = ("ppo.save_every", "ppo.rewards[*].timeout_s")


def checkpointed(stage, fp, plan) -> None:
    """A work directory as an interrupted PPO run leaves it: stamped, with a complete checkpoint."""
    (stage.begin(fp, plan, artifacts.Resume(SAFE)) / "checkpoint").mkdir()
    (stage.partial / "checkpoint" / "ppo_state.json").write_text('{"iteration": 2}')


def test_an_interrupted_run_is_kept_across_changes_that_cannot_alter_it_and_never_deleted(tmp_path, capsys):
    stage = artifacts.StageDir(tmp_path, "ppo")
    (stage.begin("fp") / "metrics.jsonl").write_text("{}")  # logs of a run that never saved: nothing to keep
    assert not (stage.begin("other", record(), artifacts.Resume(SAFE)) / "metrics.jsonl").exists()
    checkpointed(stage, "fp", record())
    assert stage.holds_checkpoint()
    stage.begin("fp", record(), artifacts.Resume(SAFE))  # the same recipe: resumed
    assert stage.holds_checkpoint()

    # save cadence and a timeout: resumed, with the changed keys named; the new recipe is recorded
    changed = record(save_every=100, rewards=[{"function": "f.py:f", "timeout_s": 5.0}])
    stage.begin("fp2", changed, artifacts.Resume(SAFE))
    assert stage.holds_checkpoint()
    assert capsys.readouterr().out.strip() == (
        "ppo: resuming across recipe changes that do not alter the run: "
        "ppo.rewards[0].timeout_s None -> 5.0, ppo.save_every 8 -> 100"
    )
    assert json.loads((stage.partial / "plan.json").read_text()) == changed

    # a learning rate and the reward function's code: refused in one line naming them, nothing touched
    altered = record(save_every=100, learning_rate=1e-3, rewards=[{"function": "f.py:f", "timeout_s": 5.0}])
    altered["inputs"]["ppo.rewards:f"]["fingerprint"] = "b"
    with pytest.raises(RecipeChanged) as e:
        stage.begin("fp3", altered, artifacts.Resume(SAFE))
    assert str(e.value) == (
        "ppo: the recipe changed since the interrupted run's last checkpoint (ppo.learning_rate "
        "1e-05 -> 0.001, the code of ppo.rewards 'f'): `make ppo RESUME=1` (--resume) goes on from "
        "that checkpoint under the new recipe; `make ppo FORCE=1` starts over, moving the "
        "checkpoints aside"
    )
    assert stage.holds_checkpoint() and (stage.partial / "fingerprint").read_text().strip() == "fp2"

    stage.begin("fp3", altered, artifacts.Resume(SAFE, changed=True))  # RESUME=1
    assert stage.holds_checkpoint() and "as asked (RESUME=1): ppo.learning_rate" in capsys.readouterr().out

    stage.begin("fp3", altered, artifacts.Resume(SAFE, force=True))  # FORCE=1: moved aside, not deleted
    aside = [d for d in tmp_path.iterdir() if d.name.startswith("ppo.set-aside-")]
    assert len(aside) == 1 and (aside[0] / "checkpoint" / "ppo_state.json").is_file()
    assert f"checkpoints were moved to {aside[0]}" in capsys.readouterr().out
    assert not stage.holds_checkpoint() and stage.partial.is_dir()


def test_missing_or_incomplete_upstream_says_which_target_to_run(tmp_path):
    with pytest.raises(MissingArtifact, match=r"does not exist: run `make sft` first"):
        artifacts.require(tmp_path / "sft", "sft")
    (tmp_path / "sft").mkdir()
    with pytest.raises(MissingArtifact, match=r"is incomplete \(no manifest.json\): run `make sft`"):
        artifacts.require(tmp_path / "sft", "sft")


def test_fingerprints_follow_content(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("a")
    first = artifacts.source_fingerprint(f)
    f.write_text("b")
    assert artifacts.source_fingerprint(f) != first
    assert artifacts.source_fingerprint("org/model") == "hub:org/model"
    assert artifacts.fingerprint({"x": 1}, {}) != artifacts.fingerprint({"x": 2}, {})
    artifacts.write_json_atomic(tmp_path / "m.json", {"k": 1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"k": 1}
