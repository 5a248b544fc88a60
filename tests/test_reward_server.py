"""Reward servers: the client against what servers do (trickle, 429, restarts, late starts, TLS, keys),
and `make serve-rm` as something to put on a network (key, bind address, limits, truncation, a
responsive /health, answers that never echo their input, non-finite scores, cross-request batching)."""

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.recipe import RewardSource
from pipeline.rl import reward_server
from pipeline.rl.rewards import RemoteReward, RewardError
from pipeline.scoring import RewardScorer, load_reward_model, reward_input_ids
from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, headers=None, timeout=60):
    """(status, parsed answer, raw bytes) of a POST, whatever the status."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw), raw
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw), raw


# ---- the client, against servers written to misbehave ----


@contextmanager
def fake_server(answer, port: int = 0):
    """A reward server on 127.0.0.1 whose every POST is `answer(handler, request_json, calls)`."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append({"body": body, "headers": dict(self.headers), "at": time.monotonic()})
            answer(self, body, calls)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/score", calls
    finally:
        server.shutdown()
        server.server_close()


def reply(handler, status: int, obj, **headers):
    raw = json.dumps(obj).encode()
    handler.send_response(status)
    for k, v in {"Content-Type": "application/json", "Content-Length": str(len(raw)), **headers}.items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(raw)


def lengths(handler, body, calls):
    reply(handler, 200, {"rewards": [float(len(c)) for c in body["completions"]]})


def remote(url, **settings) -> RemoteReward:
    return RemoteReward(RewardSource(url=url, **settings))


def test_a_server_trickling_its_answer_is_stopped_at_the_deadline():
    """timeout_s bounds the whole exchange, not each read: a server sending a byte every 0.2 s kept a
    1 s timeout waiting for its whole answer."""

    def trickle(handler, body, calls):
        handler.send_response(200)
        handler.send_header("Content-Length", "100")
        handler.end_headers()
        for _ in range(100):
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(0.2)

    with fake_server(trickle) as (url, _):
        started = time.monotonic()
        with pytest.raises(RewardError) as e:
            remote(url, timeout_s=1)(["a"], ["b"], None, {})
        elapsed = time.monotonic() - started
    assert str(e.value) == (
        f"reward server {url}: no complete answer within timeout_s = 1 s (1 attempt): raise "
        f"timeout_s, or give the server less to do"
    )
    assert elapsed < 5


def test_a_429_is_retried_after_its_retry_after_and_5xx_until_the_deadline():
    def busy_once(handler, body, calls):
        if len(calls) == 1:
            reply(handler, 429, {"detail": "busy"}, **{"Retry-After": "1"})
        elif len(calls) == 2:
            reply(handler, 503, {"detail": "warming up"})
        else:
            lengths(handler, body, calls)

    with fake_server(busy_once) as (url, calls):
        assert remote(url, timeout_s=30)(["a", "b"], ["xy", "xyz"], None, {}) == [2.0, 3.0]
    assert len(calls) == 3 and calls[1]["at"] - calls[0]["at"] >= 0.95  # it waited as asked

    def always_failing(handler, body, calls):
        reply(handler, 500, {"detail": "a bug"})

    with fake_server(always_failing) as (url, calls):
        with pytest.raises(
            RewardError,
            match=r"failed \d+ times in \d+ s \(last: HTTP 500: .*a bug.*\): see the "
            r"server's log",
        ) as e:
            remote(url, timeout_s=2)(["a"], ["b"], None, {})
    assert len(calls) >= 2 and "is it running" not in str(e.value)


@contextmanager
def up_after(delay: float, port: int):
    """A reward server that starts listening on `port` `delay` seconds from now, until the block ends."""
    stop = threading.Event()

    def run():
        time.sleep(delay)
        with fake_server(lengths, port):
            stop.wait()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)


@pytest.mark.e2e
def test_a_server_that_comes_up_late_or_restarts_is_waited_for():
    """The run's first request waits for a server that starts listening 5 s after it (one still loading
    its model); later, a server restarting for 4 s (refusing connections) is retried within the deadline."""
    port = free_port()
    client = remote(f"http://127.0.0.1:{port}/score", timeout_s=30, startup_wait_s=60)
    started = time.monotonic()
    with up_after(5, port):
        assert client(["a"], ["abc"], None, {}) == [3.0]
    assert time.monotonic() - started >= 4.5
    with up_after(4, port):  # the server went down with the block above; it is back in 4 s
        assert client(["a"], ["abcd"], None, {}) == [4.0]


def test_failures_name_their_real_cause():
    nobody = f"http://127.0.0.1:{free_port()}/score"
    with pytest.raises(RewardError) as e:
        remote(nobody, timeout_s=1, startup_wait_s=1)(["a"], ["b"], None, {})
    assert "(last: connection refused): is it running? (`make serve-rm`)" in str(e.value)
    with fake_server(lengths) as (url, _):
        with pytest.raises(RewardError) as e:  # TLS to a plain-HTTP server
            remote(url.replace("http://", "https://"), timeout_s=5)(["a"], ["b"], None, {})
    assert "TLS failed" in str(e.value) and "is it running" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(RewardError, match="cannot resolve the host 'no-such-host.invalid'"):
        remote("http://no-such-host.invalid/score", timeout_s=5)(["a"], ["b"], None, {})


def test_the_client_sends_its_api_key_from_the_environment(monkeypatch):
    def keyed(handler, body, calls):
        if handler.headers.get("Authorization") != "Bearer s3cret":
            reply(handler, 401, {"detail": "missing or wrong API key"})
        else:
            lengths(handler, body, calls)

    with fake_server(keyed) as (url, _):
        with pytest.raises(RewardError, match=r"HTTP 401: .*: the server wants an API key: set api_key_env"):
            remote(url)(["a"], ["b"], None, {})
        with pytest.raises(RewardError, match=r"the environment variable RM_TEST_KEY \(api_key_env\) is not set"):
            remote(url, api_key_env="RM_TEST_KEY")
        monkeypatch.setenv("RM_TEST_KEY", "s3cret")
        assert remote(url, api_key_env="RM_TEST_KEY")(["a"], ["bc"], None, {}) == [2.0]
        monkeypatch.setenv("RM_TEST_KEY", "wrong")
        with pytest.raises(RewardError, match="the key in api_key_env was refused"):
            remote(url, api_key_env="RM_TEST_KEY")(["a"], ["b"], None, {})
    with pytest.raises(ConfigError, match="must be the name of an environment variable"):
        from pipeline.recipe_loader import build

        build(RewardSource, {"url": url, "api_key_env": "sk-live-123"})


# ---- the server ----


@contextmanager
def serving(app):
    """An app on a free loopback port, served by uvicorn in a thread."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def reward_model(rm_run):
    path = rm_run / "demo" / "rm"
    model, tokenizer = load_reward_model(path, torch.float32)
    return path, model, tokenizer


CHAT = [{"role": "user", "content": "how was the plot of star quest ?"}]


def test_the_server_wants_its_key_and_scores_as_the_local_scorer(reward_model):
    path, model, tokenizer = reward_model
    app = reward_server.create_app(RewardScorer(model, tokenizer), "rm", api_key="s3cret", hide=str(path))
    body = {"prompts": [CHAT, CHAT], "completions": ["the plot was great .", "the plot was awful and dull"]}
    with serving(app) as url:
        assert post(url + "/score", body)[0] == 401
        assert post(url + "/score", body, {"Authorization": "Bearer wrong"})[0] == 401
        status, answer, _ = post(url + "/score", body, {"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(url + "/health") as health:  # no key needed, no path revealed
            assert json.loads(health.read()) == {"status": "ok", "model": "rm"}
        assert post(url + "/docs", {})[0] in (404, 405)
    local = RewardScorer(model, tokenizer)(body["prompts"], body["completions"])
    assert status == 200 and answer["rewards"] == pytest.approx(local.tolist(), abs=1e-5)
    assert answer["non_finite"] == 0 and abs(local[0] - local[1]) > 0.1


def test_the_server_refuses_oversized_and_malformed_requests_without_echoing_them(reward_model):
    path, model, tokenizer = reward_model
    limits = reward_server.Limits(max_body_bytes=64 << 10, max_pairs=8)
    app = reward_server.create_app(RewardScorer(model, tokenizer), "rm", limits, hide=str(path))
    secret = "SECRET-PAYLOAD-" * 1000  # 15 KB: a body of three is within the limit
    with serving(app) as url:
        status, answer, _ = post(url + "/score", {"prompts": ["a" * 100] * 1000, "completions": ["b"] * 1000})
        assert status == 413 and "at most 65536" in answer["detail"]
        status, answer, _ = post(url + "/score", {"prompts": ["a"] * 9, "completions": ["b"] * 9})
        assert status == 413 and answer["detail"] == (
            "9 pairs in one request; this server takes at most 8 (--max-pairs): split the request"
        )
        for body, expected in (
            (
                {"prompts": [{"role": 5, "content": secret}], "completions": [secret]},
                "prompts[0] must be a string, a non-empty list of {role, content} messages, or null",
            ),
            (
                {"prompts": [secret], "completions": [[{"content": secret}]]},
                "completions[0] must be a string or a non-empty list of {role, content} messages",
            ),
            (
                {"prompts": [secret, secret], "completions": [secret]},
                "2 prompts but 1 completions: give one prompt per completion",
            ),
        ):
            status, answer, raw = post(url + "/score", body)
            assert status in (400, 422) and answer == {"detail": expected}
            assert b"SECRET" not in raw and len(raw) < 300
        status, answer, raw = post(url + "/score", b"{not json" + secret.encode())
        assert status == 400 and b"SECRET" not in raw
        status, answer, raw = post(url + "/score", {"prompts": [[]], "completions": [secret]})  # no messages at all
        assert status == 422 and b"SECRET" not in raw
        assert post(url + "/score", {"prompts": ["a"], "completions": ["b ."]})[0] == 200  # still up


def test_a_long_completion_is_cut_to_the_decoder_s_positions_keeping_its_end(reward_model):
    """The demo RM reads 128 positions: a completion of thousands of tokens is scored on the last 128
    tokens of its rendering (where a decoder reads its score), as the local scorer scores those."""
    path, model, tokenizer = reward_model
    limit = reward_server.position_limit(model, tokenizer)
    assert limit == 128
    app = reward_server.create_app(RewardScorer(model, tokenizer, max_length=limit), "rm", hide=str(path))
    long = " ".join(["the plot was great and the music was loud ."] * 400)
    with serving(app) as url:
        status, answer, _ = post(url + "/score", {"prompts": [CHAT], "completions": [long]})
    ids = reward_input_ids(tokenizer, CHAT, long)
    assert status == 200 and len(ids) > 2000
    expected = RewardScorer(model, tokenizer).score_ids([ids[-limit:]])[0].item()
    assert answer["rewards"][0] == pytest.approx(expected, abs=1e-5)


def test_health_answers_while_a_large_request_is_parsed_and_scored(reward_model):
    path, model, tokenizer = reward_model
    app = reward_server.create_app(RewardScorer(model, tokenizer, max_length=128), "rm", hide=str(path))
    n = 4000
    body = {"prompts": [CHAT] * n, "completions": [" ".join(["a fine film ."] * 120)] * n}  # ~27 MB
    with serving(app) as url:
        done, latencies = threading.Event(), []
        big = threading.Thread(target=lambda: (post(url + "/score", body, timeout=600), done.set()))
        big.start()
        while not done.is_set():
            started = time.monotonic()
            with urllib.request.urlopen(url + "/health", timeout=60) as health:
                assert health.status == 200
            if not done.is_set():
                latencies.append(time.monotonic() - started)
            time.sleep(0.05)
        big.join()
    assert len(latencies) >= 5, latencies  # the large request took a while, and /health answered during it
    assert max(latencies) < 1.0, f"/health waited {max(latencies):.2f} s behind the large request"


def test_a_non_finite_score_is_answered_as_null_and_the_client_gives_no_reward(reward_model, capsys):
    path, model, tokenizer = reward_model

    class Broken(RewardScorer):
        def score_ids(self, ids):
            return torch.tensor([float("nan") if len(x) % 2 else 1.0 for x in ids])

    texts = ["the plot was great .", "the plot was great . really"]
    odd = [len(reward_input_ids(tokenizer, CHAT, t)) % 2 == 1 for t in texts]
    assert odd.count(True) == 1
    with serving(reward_server.create_app(Broken(model, tokenizer), "rm", hide=str(path))) as url:
        status, answer, _ = post(url + "/score", {"prompts": [CHAT] * 2, "completions": texts})
        assert status == 200 and answer["non_finite"] == 1
        assert answer["rewards"] == [None if o else 1.0 for o in odd]
        scores = remote(url + "/score")([CHAT] * 2, texts, None, {})
    assert [s != s for s in scores] == odd  # NaN: no reward from this source
    assert "had no finite score for 1 of 2 completions" in capsys.readouterr().err


def test_requests_in_flight_share_forwards_and_a_small_one_is_not_held_behind_a_large_one():
    class Recording:
        def __init__(self):
            self.batches, self.release = [], threading.Event()

        def score_ids(self, ids):
            self.batches.append([x[0] for x in ids])
            self.release.wait(10)
            return torch.tensor([float(x[0]) for x in ids])

    scorer = Recording()
    batcher = reward_server.Batcher(scorer, batch_size=4)
    large = batcher.submit([[100 + i] for i in range(8)])
    while not scorer.batches:  # the large request's first forward is running
        time.sleep(0.01)
    gone = batcher.submit([[7], [8]])
    small = batcher.submit([[1], [2]])
    assert gone.cancel()  # its client went away before any of its pairs was taken: never scored
    scorer.release.set()
    assert small.result(10) == [1.0, 2.0] and large.result(10) == [100.0 + i for i in range(8)]
    assert scorer.batches == [[100, 101, 102, 103], [104, 1, 105, 2], [106, 107]]
    assert batcher.pairs == 0 and batcher.submit([[5]]).result(10) == [5.0]  # and the scoring thread goes on


def test_binding_beyond_loopback_needs_a_key(reward_model, monkeypatch):
    path = str(reward_model[0])
    with pytest.raises(
        ConfigError,
        match=r"serve-rm: binding to 0.0.0.0 lets other machines in, and the server has "
        r"no API key: export a key and pass its variable's name \(make serve-rm "
        r"API_KEY_ENV=NAME\), or bind to 127.0.0.1",
    ):
        reward_server.main(["--model", path, "--host", "0.0.0.0"])
    with pytest.raises(ConfigError, match=r"the environment variable RM_TEST_KEY \(API_KEY_ENV\) is not set"):
        reward_server.main(["--model", path, "--host", "0.0.0.0", "--api-key-env", "RM_TEST_KEY"])
    assert reward_server.is_loopback("127.0.0.1") and reward_server.is_loopback("::1")
    assert not reward_server.is_loopback("0.0.0.0") and not reward_server.is_loopback("10.1.2.3")


def test_make_serve_rm_binds_to_loopback_whatever_host_says_and_takes_its_key_from_the_environment(rm_run):
    """`make serve-rm` as a user starts it, in a shell that exports HOST (as many do): the server binds
    to 127.0.0.1 (SERVE_HOST is the project's own variable) and wants the key API_KEY_ENV names."""
    port = free_port()
    env = {**os.environ, "HOST": "0.0.0.0", "RM_TEST_KEY": "s3cret"}
    process = subprocess.Popen(
        ["make", "-s", "serve-rm", f"RM={rm_run / 'demo' / 'rm'}", f"SERVE_PORT={port}", "API_KEY_ENV=RM_TEST_KEY"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        said = next((line for line in process.stdout if line.startswith("serve-rm:")), "(it exited)")
        assert said.strip().endswith(f"on http://127.0.0.1:{port}/score (API key from $RM_TEST_KEY)"), said
        url = f"http://127.0.0.1:{port}/score"
        os.environ["RM_TEST_KEY"] = "s3cret"
        try:
            scores = remote(url, api_key_env="RM_TEST_KEY", startup_wait_s=120)(
                [CHAT], ["the plot was great ."], None, {}
            )
        finally:
            del os.environ["RM_TEST_KEY"]
        assert len(scores) == 1 and scores[0] == scores[0]
        with pytest.raises(RewardError, match="HTTP 401"):
            remote(url)([CHAT], ["b"], None, {})
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
