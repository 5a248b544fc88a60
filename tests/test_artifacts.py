import json

import pytest

from pipeline import artifacts


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


def test_stale_partial_is_cleared_unless_resuming_the_same_run(tmp_path):
    stage = artifacts.StageDir(tmp_path, "ppo")
    (stage.begin("fp") / "checkpoint").write_text("step 3")
    assert (stage.begin("fp", keep_partial=True) / "checkpoint").exists()
    assert not (stage.begin("other", keep_partial=True) / "checkpoint").exists()


def test_missing_or_incomplete_upstream_says_which_target_to_run(tmp_path):
    with pytest.raises(artifacts.MissingArtifact, match=r"does not exist: run `make sft` first"):
        artifacts.require(tmp_path / "sft", "sft")
    (tmp_path / "sft").mkdir()
    with pytest.raises(artifacts.MissingArtifact, match=r"is incomplete \(no manifest.json\): run `make sft`"):
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
