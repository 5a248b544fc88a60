"""Reward functions: trl's whole contract (columns, trainer_state, log_metric, log_extra, bool and
None/NaN results, async functions on one loop, gathered), their failures in one line, deadlines,
where their files are found and what their fingerprint covers; weights; judges that fail."""

import random
import sys
import time

import pytest
import torch

from pipeline import plans, user_code
from pipeline.errors import ConfigError
from pipeline.recipe import RewardSource
from pipeline.recipe_loader import load_recipe
from pipeline.rl.rewards import FunctionReward, RewardError, Rewards, TrainerState, check_columns
from tests.conftest import DEMO_RECIPE

FUNCTIONS = """
import asyncio
import re

calls = []

def everything(prompts, completions, completion_ids, solution, **kwargs):
    calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, solution=solution,
                      **kwargs))
    return [
        float(c[-1]["content"] == s) if isinstance(c, list) else float(c == s) for c, s in zip(completions, solution)
    ]

def two_names(prompts, completions):  # no **kwargs: gets only what it names (trl would crash on completion_ids)
    return [float(len(c)) for c in completions]

def some_none(prompts, completions, **kwargs):
    return [None if "skip" in c else 1.0 for c in completions]

def one_value(prompts, completions, **kwargs):
    return 1.0

def short(prompts, completions, **kwargs):
    return [1.0]

def text_at_1(prompts, completions, **kwargs):
    return [1.0, "high", 0.0]

def infinite(prompts, completions, **kwargs):
    return [1.0, 2.0, float("inf")]

def fails(prompts, completions, **kwargs):
    raise KeyError("solution")

async def slow(prompts, completions, **kwargs):
    return [0.5 for _ in completions]

def as_numpy(prompts, completions, **kwargs):
    import numpy
    return numpy.array([0.25] * len(completions), dtype=numpy.float32)

# -- in the spirit of trl's documentation of reward functions --

def accuracy(completions, solution, **kwargs):  # compares with the dataset's `solution` column: bools
    return [c.strip() == s for c, s in zip(completions, solution)]

def format_reward(completions, log_metric, log_extra, **kwargs):  # a regex on the answer's format, with logs
    matched = [re.fullmatch(r"\\d+", c.strip()) is not None for c in completions]
    log_metric("format_share", sum(matched) / len(matched))
    log_extra("formatted", matched)
    return [1.0 if m else 0.0 for m in matched]

def curriculum(completions, trainer_state, **kwargs):  # a weight that grows over the run
    progress = trainer_state.global_step / trainer_state.max_steps
    return [progress * len(c) for c in completions]

def unsure(completions, **kwargs):  # NaN is "no reward", as None
    return [float("nan") if "?" in c else 1.0 for c in completions]

limit = asyncio.Semaphore(1)  # module-level: bound to the first event loop that waits on it

async def judged_by_a_slow_service(completions, **kwargs):
    async def one(c):
        async with limit:
            await asyncio.sleep(0.01)
            return float(len(c))
    return list(await asyncio.gather(*(one(c) for c in completions)))

ready = {}

async def first_of_a_pair(completions, **kwargs):  # finishes only if second_of_a_pair runs at the same time
    ready.setdefault("first", asyncio.Event()).set()
    await asyncio.wait_for(ready.setdefault("second", asyncio.Event()).wait(), 5)
    return [1.0] * len(completions)

async def second_of_a_pair(completions, **kwargs):
    ready.setdefault("second", asyncio.Event()).set()
    await asyncio.wait_for(ready.setdefault("first", asyncio.Event()).wait(), 5)
    return [2.0] * len(completions)

def hangs(completions, **kwargs):
    import time
    time.sleep(600)

def spins(completions, **kwargs):
    while True:
        pass

def swallows(completions, **kwargs):  # a function that catches everything still stops at its deadline
    import time
    try:
        time.sleep(600)
    except Exception:
        return [0.0] * len(completions)

async def hangs_async(completions, **kwargs):
    await asyncio.sleep(600)

def draws(completions, **kwargs):  # a judge that samples
    import random
    import torch
    return [random.random() + torch.rand(1).item() for _ in completions]

down = [0]

def service_down(completions, **kwargs):
    down[0] += 1
    raise ConnectionError("judge service down")
"""

PROMPTS = ["2 + 2 ?", "3 + 3 ?", "4 + 4 ?"]
TEXTS = ["4", "7", "skip 8"]
IDS = [[5], [6, 1], [7, 7, 1]]


@pytest.fixture
def module(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(FUNCTIONS)
    yield path
    sys.modules.pop("my_rewards", None)  # each test imports its own copy


def source(module, name, **kwargs):
    return FunctionReward(RewardSource(function=f"{module}:{name}", **kwargs))


def test_a_function_gets_trl_s_arguments_with_the_dataset_s_columns_aligned(module):
    fn = source(module, "everything", kwargs={"scale": 2})
    assert fn(PROMPTS, TEXTS, IDS, {"solution": ["4", "6", "8"]}) == [1.0, 0.0, 0.0]
    call = fn.fn.__globals__["calls"][-1]
    assert {k: v for k, v in call.items() if k not in ("trainer_state", "log_metric", "log_extra")} == {
        "prompts": PROMPTS,
        "completions": TEXTS,
        "completion_ids": IDS,
        "solution": ["4", "6", "8"],
        "scale": 2,
    }
    assert call["trainer_state"].global_step == 0 and callable(call["log_metric"]) and callable(call["log_extra"])
    # conversational prompts: completions are message lists, as trl gives them
    chat = [[{"role": "user", "content": p}] for p in PROMPTS]
    fn(chat, TEXTS, IDS, {"solution": ["4", "6", "8"]})
    assert fn.fn.__globals__["calls"][-1]["completions"][0] == [{"role": "assistant", "content": "4"}]


def test_a_function_without_kwargs_gets_only_what_it_names(module):
    assert source(module, "two_names")(PROMPTS, TEXTS, IDS, {"solution": ["4", "6", "8"]}) == [1.0, 1.0, 6.0]


@pytest.mark.parametrize(
    "name, message",
    [
        ("one_value", "returned float; it must return a list of 3 floats"),
        ("short", "returned 1 rewards for 3 completions"),
        ("text_at_1", "returned 'high' at index 1"),
        ("infinite", "returned inf at index 2"),
        ("fails", "raised KeyError: 'solution'"),
    ],
)
def test_a_bad_reward_function_is_named_in_one_line(module, name, message):
    with pytest.raises(RewardError, match=message) as e:
        source(module, name)(PROMPTS, TEXTS, IDS, {})
    assert f"my_rewards.py:{name}" in str(e.value) and "\n" not in str(e.value)


def test_a_missing_function_or_module_says_so():
    with pytest.raises(RewardError, match="has no function 'nope'"):
        FunctionReward(RewardSource(function="pipeline.demo:nope"))
    with pytest.raises(RewardError, match="cannot import 'no_such_module'"):
        FunctionReward(RewardSource(function="no_such_module:f"))


def test_weights_none_async_and_numpy(module):
    rewards = Rewards(
        {
            "skips": (source(module, "some_none"), 2.0),
            "len": (source(module, "two_names"), 0.5),
            "async": (source(module, "slow"), 1.0),
            "numpy": (source(module, "as_numpy"), 4.0),
        },
        torch.device("cpu"),
    )
    scores = rewards.score(PROMPTS, TEXTS)
    assert torch.isnan(scores["skips"][2]) and scores["async"].tolist() == [0.5, 0.5, 0.5]
    total, valid = rewards.total(scores)
    # 2 * [1, 1, None] + 0.5 * [1, 1, 6] + [0.5] * 3 + 4 * [0.25] * 3; a source's None counts 0
    assert total.tolist() == pytest.approx([4.0, 4.0, 4.5]) and valid.all()
    alone = Rewards({"skips": (source(module, "some_none"), 2.0)}, torch.device("cpu"))
    total, valid = alone.total(alone.score(PROMPTS, TEXTS))
    assert total.tolist() == [2.0, 2.0, 0.0] and valid.tolist() == [True, True, False]


def test_completion_ids_are_the_response_up_to_its_stop(module):
    fn = source(module, "everything")
    rewards = Rewards({"f": (fn, 1.0)}, torch.device("cpu"))
    responses = torch.tensor([[5, 9, 9], [6, 1, 9], [7, 7, 1]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    rewards.score(PROMPTS, TEXTS, responses, mask, {"solution": ["4", "6", "8"]})
    assert fn.fn.__globals__["calls"][-1]["completion_ids"] == IDS


def test_functions_written_for_trl_work_unchanged(module):
    """trainer_state, log_metric, log_extra, bools and NaN as trl's GRPOTrainer gives and takes them."""
    rewards = Rewards(
        {name: (source(module, name), 1.0) for name in ("accuracy", "format_reward", "curriculum", "unsure")},
        torch.device("cpu"),
    )
    texts = ["4", " 7 ", "eight?"]
    scores = rewards.score(
        PROMPTS, texts, columns={"solution": ["4", "6", "8"]}, state=TrainerState(global_step=30, max_steps=120)
    )
    assert scores["accuracy"].tolist() == [1.0, 0.0, 0.0]  # bools -> 1.0 / 0.0
    assert scores["format_reward"].tolist() == [1.0, 1.0, 0.0]
    assert scores["curriculum"].tolist() == [0.25, 0.75, 1.5]  # 1/4 of the way: a quarter of each length
    assert torch.isnan(scores["unsure"][2]) and scores["unsure"][:2].tolist() == [1.0, 1.0]  # NaN: no reward
    total, valid = rewards.total(scores)
    assert valid.all() and total.tolist() == pytest.approx([3.25, 2.75, 1.5])  # NaN counts 0, as None
    log = rewards.take_log()
    assert log.metrics == {"rewards/format_reward/format_share": [2 / 3]}
    assert log.extra == {"formatted": [True, True, False]}
    assert rewards.take_log().metrics == {}  # taken: the next batch logs afresh


def test_log_extra_takes_one_value_per_completion(tmp_path):
    path = tmp_path / "logs_badly.py"
    path.write_text(
        "def f(completions, log_extra, **kw):\n    log_extra('x', [1])\n    return [0.0] * len(completions)\n"
    )
    with pytest.raises(RewardError, match=r"log_extra\('x', ...\) got 1 values for 3 completions"):
        FunctionReward(RewardSource(function=f"{path}:f"))(PROMPTS, TEXTS, IDS, {})


def test_async_functions_share_one_event_loop_and_run_concurrently(module):
    """A module-level asyncio.Semaphore works in every batch (with an event loop per call it is bound
    to the first, and the second batch fails); two async functions run at the same time (each
    finishes only once the other has started)."""
    limited = source(module, "judged_by_a_slow_service")
    for _ in range(2):
        assert limited(PROMPTS, TEXTS, IDS, {}) == [1.0, 1.0, 6.0]
    pair = Rewards(
        {"first": (source(module, "first_of_a_pair"), 1.0), "second": (source(module, "second_of_a_pair"), 1.0)},
        torch.device("cpu"),
    )
    scores = pair.score(PROMPTS, TEXTS)
    assert scores["first"].tolist() == [1.0] * 3 and scores["second"].tolist() == [2.0] * 3


@pytest.mark.parametrize("name", ["hangs", "spins", "swallows", "hangs_async"])
def test_a_hung_function_is_stopped_at_its_deadline(module, name):
    fn = source(module, name, timeout_s=1)
    started = time.monotonic()
    with pytest.raises(RewardError) as e:
        fn(PROMPTS, TEXTS, IDS, {})
    assert str(e.value) == (
        f"reward function '{module}:{name}' did not return within timeout_s = 1 s: make it "
        f"faster, or raise its timeout_s"
    )
    assert time.monotonic() - started < 30
    assert source(module, "two_names", timeout_s=1)(PROMPTS, TEXTS, IDS, {}) == [1.0, 1.0, 6.0]  # and then goes on


def test_a_failing_judge_gives_nan_and_a_warning_rests_and_leaves_the_run_s_randomness_alone(module, capsys):
    """A judge that fails scores NaN with a warning, and rests for 1, then 3 batches; judges leave the
    random generators as they found them (the run samples the same rollouts with or without them); a
    failing reward stops the batch."""
    judges = Rewards(
        {"draws": (source(module, "draws"), 1.0), "down": (source(module, "service_down"), 1.0)},
        torch.device("cpu"),
        watched=True,
    )
    python, generator = random.getstate(), torch.get_rng_state()
    for _ in range(4):
        scores = judges.score(PROMPTS, TEXTS)
        assert torch.isnan(scores["down"]).all() and not torch.isnan(scores["draws"]).any()
    assert random.getstate() == python and torch.equal(torch.get_rng_state(), generator)
    assert judges.sources["down"][0].fn.__globals__["down"] == [2]  # called in batches 1 and 3 only
    warnings = capsys.readouterr().err.strip().splitlines()
    assert warnings == [
        f"warning: reward function '{module}:service_down' raised ConnectionError: judge service down "
        f"(a judge: its score is NaN for this batch and the next {n}; training goes on)"
        for n in (1, 3)
    ]
    rewards = Rewards(
        {"broken": (source(module, "fails"), 1.0), "ok": (source(module, "two_names"), 1.0)}, torch.device("cpu")
    )
    with pytest.raises(RewardError, match="raised KeyError"):
        rewards.score(PROMPTS, TEXTS)


def test_a_kwarg_named_like_a_column_or_a_contract_argument_is_refused(tmp_path):
    spec = RewardSource(function="my_rewards.py:f", kwargs={"solution": "x", "scale": 2})
    with pytest.raises(
        ConfigError,
        match=r"ppo.rewards 'f': kwargs \['solution'\] are also columns of the prompt "
        r"dataset",
    ):
        check_columns({"ppo.rewards": [spec]}, ["solution", "difficulty"])
    check_columns({"ppo.rewards": [spec]}, ["difficulty"])
    with pytest.raises(ConfigError, match=r"kwargs \['trainer_state'\]: the function receives these itself"):
        load_recipe(DEMO_RECIPE, ["ppo.rewards=[{function: 'f.py:f', kwargs: {trainer_state: 1}}]"])


RECIPE = """
extends: {demo}
ppo:
  rewards: [{{function: "my_rewards.py:graded"}}]
  judges: []
"""
GRADED = """
from dataclasses import dataclass
from helpers import bonus          # a module next to it

@dataclass
class Grade:                        # needs its module in sys.modules
    value: float

def graded(completions, **kwargs):
    return [Grade(len(c) + bonus()).value for c in completions]
"""


def test_a_function_file_next_to_the_recipe_imports_its_siblings_from_any_directory(tmp_path, monkeypatch):
    """`file.py:name` is found next to the recipe (not the working directory); its siblings import;
    a @dataclass in it works; it is registered as its own module; its fingerprint covers the sibling,
    so editing the helper re-runs the stage."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "recipe.yaml").write_text(RECIPE.format(demo=DEMO_RECIPE))
    (project / "my_rewards.py").write_text(GRADED)
    (project / "helpers.py").write_text("def bonus():\n    return 10\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("my_rewards", "helpers"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    recipe = load_recipe(project / "recipe.yaml")
    fn = FunctionReward(recipe.ppo.rewards[0])
    assert fn(PROMPTS, TEXTS, IDS, {}) == [11.0, 11.0, 16.0]
    assert sys.modules["my_rewards"].__file__ == str(project / "my_rewards.py")
    (project / "my_rewards.py").write_text(GRADED.replace("+ bonus()", "+ 2 * bonus()"))  # edited: imported again
    assert FunctionReward(recipe.ppo.rewards[0])(PROMPTS, TEXTS, IDS, {}) == [21.0, 21.0, 26.0]

    first = user_code.fingerprint("my_rewards.py:graded", str(project), "ppo.rewards 'graded'")
    assert first["files"] == ["helpers.py", "my_rewards.py"]
    (project / "helpers.py").write_text("def bonus():\n    return 20\n")
    assert user_code.fingerprint("my_rewards.py:graded", str(project), "x")["fingerprint"] != first["fingerprint"]


def test_the_rl_stage_s_fingerprint_follows_a_function_s_local_imports_and_refuses_a_missing_file(
    tmp_path, runs_with_sft
):
    """Editing a module the reward function imports (here through a package, relatively) re-runs the
    stage; a file that is not there is one line at plan time, not a hub id."""
    (tmp_path / "scoring_pkg").mkdir()
    (tmp_path / "scoring_pkg" / "__init__.py").write_text("")
    (tmp_path / "scoring_pkg" / "rules.py").write_text(
        "from .weights import W\n\ndef f(completions, **kw):\n    return [W] * len(completions)\n"
    )
    (tmp_path / "scoring_pkg" / "weights.py").write_text("W = 1.0\n")
    (tmp_path / "recipe.yaml").write_text(
        f"extends: {DEMO_RECIPE}\nrun_name: demo\nruns_dir: {runs_with_sft}\n"
        f"ppo:\n  rewards: [{{function: 'scoring_pkg.rules:f'}}]\n  judges: []\n"
    )
    before = plans.ppo(load_recipe(tmp_path / "recipe.yaml"))
    (tmp_path / "scoring_pkg" / "weights.py").write_text("W = 2.0\n")
    after = plans.ppo(load_recipe(tmp_path / "recipe.yaml"))
    assert after.fingerprint != before.fingerprint
    assert after.inputs["ppo.rewards:f"]["files"] == ["__init__.py", "rules.py", "weights.py"]
    with pytest.raises(ConfigError, match=r"ppo.rewards 'f': file 'nowhere.py' not found in "):
        plans.ppo(load_recipe(tmp_path / "recipe.yaml", ["ppo.rewards=[{function: 'nowhere.py:f'}]"]))


def test_a_reward_error_on_one_process_is_said_by_that_process(monkeypatch):
    """Other errors are met by every rank alike and said by rank 0; a reward function can fail on the
    rollouts of one rank only, which must not exit silently."""
    from pipeline import process

    def fails():
        raise RewardError("reward function 'f' returned 'x' at index 3")

    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        process.run(fails)
    assert e.value.code == "error (process 1): reward function 'f' returned 'x' at index 3"


def test_the_process_group_waits_as_long_as_a_batch_s_rewards_may_take():
    """A process scoring its batch keeps the others waiting in the next collective: the RL stage's
    process group waits for the sum of its functions' and servers' deadlines (a server's start-up
    wait too), reward models aside."""
    recipe = load_recipe(
        DEMO_RECIPE,
        [
            "ppo.rewards=[{model: rm}, {function: 'f.py:f', timeout_s: 20}, "
            "{url: 'http://127.0.0.1:1/score', timeout_s: 30, startup_wait_s: 40}]",
            "ppo.judges=[{function: 'g.py:g'}]",
        ],
    )
    assert recipe.ppo.scoring_deadline_s == 20 + 30 + 40 + 300
