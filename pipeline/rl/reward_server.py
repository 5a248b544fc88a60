"""A reward model behind HTTP: `make serve-rm` (FastAPI + uvicorn).

    make serve-rm                                      # this run's RM artifact on 127.0.0.1:8000
    make serve-rm RM=path/or/hub-id SERVE_PORT=8001    # any sequence classifier with one output
    export RM_KEY=...; make serve-rm SERVE_HOST=0.0.0.0 API_KEY_ENV=RM_KEY   # on the network: with a key

POST /score  {"prompts": [...], "completions": [...]}  ->  {"rewards": [...], "non_finite": n}
GET  /health ->  {"status": "ok", "model": <the model's name>}

Prompts are strings, message lists or null, completions strings or message lists, one per prompt;
each pair is scored exactly as `RewardScorer` scores it locally (the RM stage's own rendering). The
RL stage reads it with `ppo.rewards: [{url: "http://127.0.0.1:8000/score"}]` (pipeline/rl/rewards.py).

- Access: with `--api-key-env NAME` every /score request must carry `Authorization: Bearer <the
  value of NAME>` (401 otherwise); the key is read from the environment, never from a command line.
  Binding to anything but loopback without a key is refused.
- Limits: a body over `--max-body-mb` gets 413 (read no further), more than `--max-pairs` pairs 413;
  a rendered pair longer than the model's positions (or `--max-length`) keeps its last tokens, where
  a decoder reads its score (encoders: their own cut, `scoring.encoder_input_ids`). A malformed
  request gets 400 / 422 with its reason, which never quotes the input; no answer names a path.
- Concurrency: bodies are read asynchronously (PARSING_AT_ONCE in memory at once) and parsed and
  tokenized on worker threads, so /health answers at once under any load; one scoring thread runs
  the forwards, each of up to `--batch-size` pairs taken in turn from every request waiting
  (`Batcher`): requests that arrive together share forwards, and a large one does not hold back the
  small ones behind it. Past `max_waiting_pairs` waiting, 503 with Retry-After.
- A score that is not finite is answered as null, with `non_finite` counting them: the client gives
  those completions no reward from this server, and says so; it is never a 500 that invites retries.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import hmac
import ipaddress
import json
import math
import os
import sys
import threading
import traceback
from dataclasses import dataclass, field

from pipeline import cli, process

if __name__ == "__main__":  # the server's process: before the libraries load
    process.before_libraries()

import jinja2
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from pipeline import artifacts, models, plans
from pipeline.errors import ConfigError, UserError
from pipeline.scoring import RewardScorer, load_reward_model, reward_input_ids

PARSING_AT_ONCE = 4  # requests parsed and tokenized at the same time (each may hold a body of max_body_bytes)


@dataclass
class Limits:
    max_body_bytes: int = 32 << 20
    max_pairs: int = 4096
    max_waiting_pairs: int = 65536
    """Pairs rendered and waiting for the model, over every request: beyond, 503 with Retry-After."""


class Rejected(Exception):
    """A request answered with a 4xx and its reason (which never quotes the request)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _message_list(x) -> bool:
    return (
        isinstance(x, list)
        and len(x) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in x)
    )


def parse(body: bytes, limits: Limits) -> tuple[list, list]:
    """A /score body -> (prompts, completions), or Rejected saying what is wrong and where."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Rejected(400, 'the body is not JSON: send {"prompts": [...], "completions": [...]}') from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("prompts"), list)
        or not isinstance(data.get("completions"), list)
    ):
        raise Rejected(422, "the body must be a JSON object with the lists 'prompts' and 'completions'")
    prompts, completions = data["prompts"], data["completions"]
    if len(prompts) != len(completions):
        raise Rejected(
            400, f"{len(prompts)} prompts but {len(completions)} completions: give one prompt per completion"
        )
    if len(completions) > limits.max_pairs:
        raise Rejected(
            413,
            f"{len(completions)} pairs in one request; this server takes at most {limits.max_pairs} "
            f"(--max-pairs): split the request",
        )
    for i, p in enumerate(prompts):
        if not (p is None or isinstance(p, str) or _message_list(p)):
            raise Rejected(
                422, f"prompts[{i}] must be a string, a non-empty list of {{role, content}} messages, or null"
            )
    for i, c in enumerate(completions):
        if not (isinstance(c, str) or _message_list(c)):
            raise Rejected(422, f"completions[{i}] must be a string or a non-empty list of {{role, content}} messages")
    return prompts, completions


@dataclass(eq=False)  # a request's job is itself, whatever its contents
class _Job:
    ids: list[list[int]]
    scores: list = field(default_factory=list)
    taken: int = 0
    done: int = 0
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Batcher:
    """One thread runs the reward model: each forward takes up to `batch_size` rendered pairs, one at a
    time from each request waiting in turn. A request whose client has gone (its future cancelled
    before its first pair was taken) is dropped."""

    def __init__(self, scorer: RewardScorer, batch_size: int):
        self.scorer, self.batch_size = scorer, batch_size
        self.waiting: collections.deque[_Job] = collections.deque()
        self.pairs = 0  # rendered pairs waiting, over every request
        self.ready = threading.Condition()
        threading.Thread(target=self._run, daemon=True, name="scoring").start()

    def submit(self, ids: list[list[int]]) -> concurrent.futures.Future:
        """The scores of these rendered pairs, once scored: a list of floats."""
        job = _Job(ids, [None] * len(ids))
        if not ids:
            job.future.set_result([])
            return job.future
        with self.ready:
            self.waiting.append(job)
            self.pairs += len(ids)
            self.ready.notify()
        return job.future

    def _take(self) -> list[tuple[_Job, int]]:
        rows = []
        while self.waiting and len(rows) < self.batch_size:
            job = self.waiting.popleft()
            if job.taken == 0 and not job.future.set_running_or_notify_cancel():  # cancelled: never scored
                self.pairs -= len(job.ids)
                continue
            rows.append((job, job.taken))
            job.taken += 1
            self.pairs -= 1
            if job.taken < len(job.ids):
                self.waiting.append(job)  # its next pair after one of every other request's
        return rows

    def _run(self) -> None:
        while True:
            with self.ready:
                while not self.waiting:
                    self.ready.wait()
                rows = self._take()
            if not rows:
                continue
            try:
                scores = self.scorer.score_ids([job.ids[i] for job, i in rows]).tolist()
            except Exception as e:  # the model failed on these: every request with a pair among them fails
                traceback.print_exc()
                for job in dict.fromkeys(job for job, _ in rows):
                    with self.ready:
                        if job in self.waiting:
                            self.waiting.remove(job)
                            self.pairs -= len(job.ids) - job.taken
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            for (job, i), score in zip(rows, scores):
                job.scores[i] = score
                job.done += 1
                if job.done == len(job.ids) and not job.future.done():
                    job.future.set_result(job.scores)


def create_app(
    scorer: RewardScorer,
    name: str,
    limits: Limits | None = None,
    api_key: str | None = None,
    batch_size: int = 64,
    hide: str | None = None,
) -> FastAPI:
    """The app: `name` is what /health calls the model; `hide` (its path) never appears in an answer."""
    limits = limits or Limits()
    app = FastAPI(
        title="reward model",
        description=f"scores (prompt, completion) pairs with {name}",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    batcher = Batcher(scorer, batch_size)
    reading = asyncio.Semaphore(PARSING_AT_ONCE)  # bodies in memory at once, until rendered
    rendering = threading.Lock()  # one tokenizer: its truncation settings are set per call (encoders)
    expected = f"Bearer {api_key}".encode() if api_key else None

    def rendered(body: bytes) -> list[list[int]]:
        prompts, completions = parse(body, limits)
        with rendering:
            for i, (p, c) in enumerate(zip(prompts, completions)):
                try:
                    yield reward_input_ids(scorer.tokenizer, p, c)
                except (UserError, jinja2.TemplateError) as e:  # e.g. no chat template, or one that refuses the roles
                    reason = " ".join(str(e).split())[:200]
                    raise Rejected(
                        422,
                        f"cannot render pair {i} with this reward model: "
                        f"{reason.replace(hide, name) if hide else reason}",
                    ) from None
                except Exception as e:  # its message might quote the input: only its kind
                    raise Rejected(422, f"cannot render pair {i} with this reward model ({type(e).__name__})") from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.post("/score")
    async def score(request: Request):
        try:
            if expected is not None and not hmac.compare_digest(
                request.headers.get("authorization", "").encode(), expected
            ):
                return JSONResponse(
                    {"detail": "missing or wrong API key (Authorization: Bearer <key>)"},
                    401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
                raise Rejected(
                    413,
                    f"the body is {int(declared)} bytes; this server takes at most "
                    f"{limits.max_body_bytes} (--max-body-mb): split the request",
                )
            async with reading:
                chunks, size = [], 0
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limits.max_body_bytes:
                        raise Rejected(
                            413,
                            f"the body is over {limits.max_body_bytes} bytes, the most this server "
                            f"takes (--max-body-mb): split the request",
                        )
                    chunks.append(chunk)
                ids = await run_in_threadpool(lambda: list(rendered(b"".join(chunks))))
            if batcher.pairs + len(ids) > limits.max_waiting_pairs:
                return JSONResponse(
                    {"detail": f"{batcher.pairs} pairs are waiting to be scored: try again shortly"},
                    503,
                    headers={"Retry-After": "1"},
                )
            scores = await asyncio.wrap_future(batcher.submit(ids))
        except Rejected as e:
            return JSONResponse({"detail": e.reason}, e.status)
        except Exception:
            traceback.print_exc()
            return JSONResponse({"detail": "internal error: see the server's log"}, 500)
        non_finite = sum(not math.isfinite(s) for s in scores)
        if non_finite:
            print(
                f"warning: {non_finite} of {len(scores)} scores were not finite (answered as null)",
                file=sys.stderr,
                flush=True,
            )
        return {"rewards": [s if math.isfinite(s) else None for s in scores], "non_finite": non_finite}

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def position_limit(model, tokenizer) -> int | None:
    """The longest input the model reads: its position table (its tokenizer's length if smaller)."""
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    stated = tokenizer.model_max_length if tokenizer.model_max_length < 1e9 else None
    return min(filter(None, (positions, stated)), default=None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a reward model over HTTP.")
    parser.add_argument("--model", help="a reward model (directory or hub id); default: the recipe's RM artifact")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key-env", metavar="NAME", help="the environment variable holding the API key /score requests must carry"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per forward pass")
    parser.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (MiB)")
    parser.add_argument("--max-pairs", type=int, default=4096, help="most pairs in one request")
    parser.add_argument(
        "--max-length",
        type=int,
        help="tokens of a rendered pair the model reads, its last ones (default: the model's positions)",
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    known, rest = parser.parse_known_args(argv)
    for flag in ("batch_size", "max_pairs", "max_length"):
        if getattr(known, flag) is not None and getattr(known, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1")
    if known.max_body_mb <= 0:
        raise ConfigError("--max-body-mb must be > 0")
    api_key = None
    if known.api_key_env:
        api_key = os.environ.get(known.api_key_env)
        if not api_key:
            raise ConfigError(
                f"serve-rm: the environment variable {known.api_key_env} (API_KEY_ENV) is not set: "
                f"export it with the key clients must send"
            )
    elif not is_loopback(known.host):
        raise ConfigError(
            f"serve-rm: binding to {known.host} lets other machines in, and the server has no API key: "
            f"export a key and pass its variable's name (make serve-rm API_KEY_ENV=NAME), or bind to "
            f"127.0.0.1"
        )
    recipe, _ = cli.parse("recipe (for the default reward model)", rest)
    path = known.model or plans.reward_model(recipe)
    if known.model is None and not recipe.ppo.reward_model:
        artifacts.require(path, "rm")  # this run's RM stage: "run `make rm` first" if it is missing
    else:
        artifacts.check_model_source(path, "RM" if known.model else "ppo.reward_model")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_reward_model(path, models.resolve_dtype(known.dtype))
    limit = position_limit(model, tokenizer)
    if known.max_length and limit and known.max_length > limit:
        raise ConfigError(f"--max-length {known.max_length} is more than the model's {limit} positions")
    scorer = RewardScorer(
        model.to(device), tokenizer, device, batch_size=known.batch_size, max_length=known.max_length or limit
    )
    name = str(path).rstrip("/").rsplit("/", 1)[-1] if os.path.exists(str(path)) else str(path)
    app = create_app(
        scorer, name, Limits(int(known.max_body_mb * 2**20), known.max_pairs), api_key, known.batch_size, hide=str(path)
    )

    import uvicorn  # only the server needs it

    access = f"API key from ${known.api_key_env}" if api_key else "no API key: this machine only"
    print(f"serve-rm: {path} on http://{known.host}:{known.port}/score ({access})", flush=True)
    uvicorn.run(app, host=known.host, port=known.port, log_level="warning")


if __name__ == "__main__":
    process.run_and_exit(lambda: main(sys.argv[1:]))
