"""Reward sources: functions with trl's contract, their failures in one line, weights, and the reward
server (`make serve-rm`) against the local scorer."""

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import torch

from pipeline.config import RewardSource
from pipeline.rl import rewards as rewards_module
from pipeline.rl.rewards import FunctionReward, RemoteReward, RewardError, Rewards
from pipeline.scoring import RewardScorer, load_reward_model
from tests.conftest import REPO

FUNCTIONS = '''
calls = []

def everything(prompts, completions, completion_ids, solution, **kwargs):
    calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, solution=solution,
                      **kwargs))
    return [float(c[-1]["content"] == s) if isinstance(c, list) else float(c == s) for c, s in zip(completions, solution)]

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

def nan(prompts, completions, **kwargs):
    return [1.0, 2.0, float("nan")]

def fails(prompts, completions, **kwargs):
    raise KeyError("solution")

async def slow(prompts, completions, **kwargs):
    return [0.5 for _ in completions]

def as_numpy(prompts, completions, **kwargs):
    import numpy
    return numpy.array([0.25] * len(completions), dtype=numpy.float32)
'''

PROMPTS = ["2 + 2 ?", "3 + 3 ?", "4 + 4 ?"]
TEXTS = ["4", "7", "skip 8"]
IDS = [[5], [6, 1], [7, 7, 1]]


@pytest.fixture
def module(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(FUNCTIONS)
    return path


def source(module, name, **kwargs):
    return FunctionReward(RewardSource(function=f"{module}:{name}", **kwargs))


def test_a_function_gets_trl_s_arguments_with_the_dataset_s_columns_aligned(module):
    fn = source(module, "everything", kwargs={"scale": 2})
    assert fn(PROMPTS, TEXTS, IDS, {"solution": ["4", "6", "8"]}) == [1.0, 0.0, 0.0]
    call = fn.fn.__globals__["calls"][-1]
    assert call == {"prompts": PROMPTS, "completions": TEXTS, "completion_ids": IDS, "solution": ["4", "6", "8"],
                    "scale": 2}
    # conversational prompts: completions are message lists, as trl gives them
    chat = [[{"role": "user", "content": p}] for p in PROMPTS]
    fn(chat, TEXTS, IDS, {"solution": ["4", "6", "8"]})
    assert fn.fn.__globals__["calls"][-1]["completions"][0] == [{"role": "assistant", "content": "4"}]


def test_a_function_without_kwargs_gets_only_what_it_names(module):
    assert source(module, "two_names")(PROMPTS, TEXTS, IDS, {"solution": ["4", "6", "8"]}) == [1.0, 1.0, 6.0]


@pytest.mark.parametrize("name, message", [
    ("one_value", "returned float; it must return a list of 3 floats"),
    ("short", "returned 1 rewards for 3 completions"),
    ("text_at_1", "returned 'high' at index 1"),
    ("nan", "returned nan at index 2"),
    ("fails", "raised KeyError: 'solution'"),
])
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
    rewards = Rewards({"skips": (source(module, "some_none"), 2.0), "len": (source(module, "two_names"), 0.5),
                       "async": (source(module, "slow"), 1.0), "numpy": (source(module, "as_numpy"), 4.0)},
                      torch.device("cpu"))
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


def test_a_reward_error_on_one_process_is_said_by_that_process(monkeypatch):
    """Other errors are met by every rank alike and said by rank 0; a reward function can fail on the
    rollouts of one rank only, which must not exit silently."""
    from pipeline import cli

    def fails():
        raise RewardError("reward function 'f' returned 'x' at index 3")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        cli.run(fails)
    assert e.value.code == "error (process 1): reward function 'f' returned 'x' at index 3"


# ---- the reward server ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(rm_run):
    """`make serve-rm RM=<the session's reward model> PORT=<free>`, as a user starts it."""
    port = free_port()
    process = subprocess.Popen(["make", "-s", "serve-rm", f"RM={rm_run / 'demo' / 'rm'}", f"PORT={port}"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except (urllib.error.URLError, ConnectionError):
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.5)
    yield url
    import os
    import signal
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def test_the_reward_server_scores_as_the_local_scorer(server, rm_run):
    prompts = [[{"role": "user", "content": "how was the plot of star quest ?"}],
               [{"role": "user", "content": "review the music of red valley ."}]] * 3
    texts = ["the plot was great .", "the music was awful and dull"] * 3
    model, tokenizer = load_reward_model(rm_run / "demo" / "rm", torch.float32)
    local = RewardScorer(model, tokenizer)(prompts, texts)
    remote = RemoteReward(RewardSource(url=server + "/score"))(prompts, texts, None, {})
    assert remote == pytest.approx(local.tolist(), abs=1e-5)
    assert abs(local[0] - local[1]) > 0.1  # the pairs are told apart: not a constant


def test_the_reward_server_answers_a_malformed_request_with_its_reason_and_stays_up(server):
    for body, status, reason in (({"prompts": ["a", "b"], "completions": ["x"]}, 400, "2 prompts but 1 completions"),
                                 ({"prompts": "a"}, 422, "completions")):
        with pytest.raises(urllib.error.HTTPError) as e:
            post(server + "/score", body)
        assert e.value.code == status and reason in e.value.read().decode()
    assert len(post(server + "/score", {"prompts": ["a"], "completions": ["b ."]})["rewards"]) == 1
    with pytest.raises(RewardError, match="refused the request"):  # the client does not retry a 4xx
        RemoteReward(RewardSource(url=server + "/nowhere"))(["a"], ["b"], None, {})


def test_a_stopped_server_is_a_one_line_error_not_a_silent_zero(monkeypatch):
    url = f"http://127.0.0.1:{free_port()}/score"  # nothing listens there
    monkeypatch.setattr(rewards_module, "BACKOFF_S", 0.05)
    started = time.time()
    with pytest.raises(RewardError) as e:
        RemoteReward(RewardSource(url=url, timeout_s=2))(["a"], ["b"], None, {})
    message = str(e.value)
    assert url in message and f"failed {rewards_module.RETRIES} times" in message and "refused" in message.lower()
    assert "\n" not in message and time.time() - started < 10
