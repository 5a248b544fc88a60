import json
import statistics

from pipeline import demo
from pipeline.demo import score

PROMPT = "how was the music of star quest ?"


def test_judge_hand_computed_scores():
    # sentiment: wonderful 1.5 (intensified) + great 1 = 2.5 -> clipped 2 -> 1.0; on topic +0.5
    assert score(PROMPT, "the music was really wonderful and the plot was great .") == 1.5
    # negation flips: "not great" = -1 -> -0.5; on topic +0.5
    assert score(PROMPT, "the music was not great .") == 0.0
    # off topic, neutral, fine otherwise
    assert score(PROMPT, "the plot was okay .") == 0.0
    # conversational forms are accepted
    assert (
        score([{"role": "user", "content": PROMPT}], [{"role": "assistant", "content": "the music was great ."}]) == 1.0
    )


def test_judge_penalises_degenerate_text():
    good = score(PROMPT, "the music was great .")
    assert score(PROMPT, "the music was great") == good - 1.0  # no ending
    # two adjectives lift sentiment to 1.0, but the repeat costs 0.5 and the repeated adjective 0.25
    assert score(PROMPT, "the music was great great .") == 1.0 + 0.5 - 0.5 - 0.25
    rambling = "the music was great and the plot was fine and the cast was okay and the story was long ."
    assert len(rambling.split()) == 20 and score(PROMPT, rambling) == 1.0 - 0.6
    assert score(PROMPT, "the music .") == 0.5 - 0.5  # says nothing
    assert score(PROMPT, "") == -3.0


def test_committed_demo_files_are_what_the_generator_makes(tmp_path):
    demo.write(tmp_path)
    for name in demo.build():
        assert (tmp_path / name).read_bytes() == open(f"data/demo/{name}", "rb").read(), name


def test_demo_data_measures_rlhf_honestly():
    rows = [json.loads(line) for line in open("data/demo/sft_train.jsonl")]
    scores = [score(r["prompt"], r["completion"]) for r in rows]
    assert 0 < statistics.mean(scores) < 0.8 < max(scores)  # mixed quality: room for PPO
    pairs = [json.loads(line) for line in open("data/demo/preferences_test.jsonl")]
    agree = statistics.mean(score(p["prompt"], p["chosen"]) > score(p["prompt"], p["rejected"]) for p in pairs)
    assert 0.8 < agree < 0.95  # noisy labels: the reward model must learn the judge, not copy it
    heldout = {r["prompt"][0]["content"] for r in map(json.loads, open("data/demo/prompts_heldout.jsonl"))}
    train = {r["prompt"][0]["content"] for r in map(json.loads, open("data/demo/prompts_train.jsonl"))}
    assert heldout and not heldout & train
