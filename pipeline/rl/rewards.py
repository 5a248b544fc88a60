"""Where rewards come from: reward models, Python functions, reward servers; and judges.

`ppo.rewards` lists the sources the policy optimises (their weighted sum); `ppo.judges` and
`eval.judges` list sources that are only watched. Every source scores a batch the same way:

    source(prompts, texts, completion_ids, columns) -> (B,) float32, NaN where it gives no reward

- `ModelReward`: a sequence classifier read through `RewardScorer`, exactly as the RM stage trained it.
- `FunctionReward`: trl's reward-function contract (`GRPOTrainer._calculate_rewards`), so functions
  written for trl work unchanged: called by keyword with `prompts`, `completions` (strings, or
  `[{"role": "assistant", "content": ...}]` when the prompts are conversations), `completion_ids`,
  every other column of the prompt dataset (one value per completion), `trainer_state` (the run's
  progress), `log_metric(name, value)`, `log_extra(column, values)`, and the source's `kwargs`;
  returns a float, a bool or None (NaN too) per completion. A function without `**kwargs` gets only
  the arguments it names (a classic crash with trl: `def f(prompts, completions)` meeting
  `completion_ids`). Each call has a deadline (pipeline/user_code.py); async functions run
  concurrently on one event loop.
- `RemoteReward`: POST {"prompts", "completions"} to a server (`make serve-rm`, pipeline/rl/
  reward_server.py) that answers {"rewards"}, within a deadline, retrying what servers do while
  they restart or are busy; then one line naming the URL and the cause. Never a silent 0.

A completion with no reward (None) from a source is left out of that source's mean; one with no reward
from any source gets advantage 0 (`Rewards.total`).
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import inspect
import json
import math
import numbers
import os
import random
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline import user_code
from pipeline.data import is_conversational
from pipeline.errors import ConfigError, RewardError
from pipeline.models import special_ids
from pipeline.recipe import RewardSource
from pipeline.scoring import RewardScorer, load_reward_model, reward_input_ids, turn_closing
from pipeline.user_code import one_line

BACKOFF_S = 0.5  # a reward server's first retry waits about this long; each next one twice as long
BACKOFF_MAX_S = 8.0


def check_rewards(values, n: int, who: str) -> list[float]:
    """One float per completion (None or NaN: no reward, NaN; a bool: 1.0 or 0.0, as trl turns them into
    a tensor), or one line naming `who` and the first bad index."""
    if hasattr(values, "tolist"):  # a tensor or numpy array
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(
            f"{who} returned {type(values).__name__}; it must return a list of {n} floats (or None), one per completion"
        )
    if len(values) != n:
        raise RewardError(
            f"{who} returned {len(values)} rewards for {n} completions (one per completion, None to give none)"
        )
    out = []
    for i, v in enumerate(values):
        try:
            if hasattr(v, "dtype") and hasattr(v, "item"):  # a numpy or torch scalar
                v = v.item()
            number = math.nan if v is None else float(v) if isinstance(v, numbers.Real) else None  # bool: 1.0 / 0.0
        except (TypeError, ValueError, OverflowError):  # an array of several, an int past float's range
            number = None
        if number is None or math.isinf(number):
            raise RewardError(
                f"{who} returned {one_line(repr(v))[:80]} at index {i}: a reward is a finite number, "
                f"a bool, or None (or NaN: no reward)"
            )
        out.append(number)
    return out


@contextlib.contextmanager
def _rng_untouched():
    """Python's, numpy's and torch's (CPU and CUDA) generators as they were before the block."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        yield
    random.setstate(python)
    np.random.set_state(numpy)


def check_columns(sections: dict[str, list[RewardSource]], columns) -> None:
    """A function's `kwargs` entry named like a column of the prompt dataset would hide that column
    from it: refused once the columns are known, before any model loads."""
    for section, specs in sections.items():
        for spec in specs:
            clash = sorted(set(spec.kwargs) & set(columns))
            if clash:
                raise ConfigError(
                    f"{section} '{spec.label}': kwargs {clash} are also columns of the prompt dataset, "
                    f"which the function receives under those names: rename the kwargs"
                )


# ---------------------------------------------------------------------------------------------
# Functions
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainerState:
    """The run's progress, as reward functions written for trl read it (`trainer_state`): the progress
    fields of transformers' TrainerState. Our own class because importing transformers' loads the
    Trainer's stack (peft, bitsandbytes: seconds) into a PPO process that needs none of it."""

    global_step: int = 0
    """Optimiser steps done."""
    max_steps: int = 0
    """Optimiser steps of the whole run."""
    epoch: float = 0.0
    """Passes over the prompt dataset done (fractional)."""
    num_train_epochs: float = 0.0
    """Passes over the prompt dataset the whole run makes."""
    is_world_process_zero: bool = True
    is_local_process_zero: bool = True


@dataclass
class FunctionLog:
    """What reward functions logged in one batch through trl's `log_metric` and `log_extra`."""

    metrics: dict[str, list[float]] = field(default_factory=dict)
    """'<rewards|judges>/<source>/<name>' -> the values logged (their mean is the iteration's metric)."""
    extra: dict[str, list] = field(default_factory=dict)
    """column -> one value per completion, for samples.jsonl."""

    def log_metric(self, prefix: str) -> Callable[[str, float], None]:
        def log_metric(name: str, value: float) -> None:
            self.metrics.setdefault(f"{prefix}/{name}", []).append(float(value))

        return log_metric

    def log_extra(self, n: int, who: str) -> Callable[[str, list], None]:
        def log_extra(column: str, values: list) -> None:
            values = list(values)
            if len(values) != n:
                raise RewardError(
                    f"{who}: log_extra('{column}', ...) got {len(values)} values for {n} completions "
                    f"(one per completion)"
                )
            self.extra[column] = values

        return log_extra


class FunctionReward:
    """A Python reward function with trl's contract (see the module docstring)."""

    def __init__(self, spec: RewardSource):
        self.spec, self.who = spec, f"reward function '{spec.function}'"
        self.fn = user_code.load(spec.function, spec.base_dir, self.who)
        self.is_async = user_code.is_async(self.fn)
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):  # a callable without a signature: give it everything
            params = {"kwargs": inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)}
        self.takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.names = set(params)

    def start(
        self,
        prompts,
        texts,
        completion_ids,
        columns,
        state: TrainerState | None = None,
        log: FunctionLog | None = None,
        prefix: str = "rewards",
        exchanges: list[list[dict]] | None = None,
    ) -> Callable[[], list[float]]:
        """Call the function on a batch; what it returns gives its rewards. A sync function runs now; an
        async one is started on the event loop and runs while the caller goes on. `exchanges`: an
        agent's rollouts, each its messages after the prompt (the completions trl passes with tools)."""
        log = log if log is not None else FunctionLog()
        if exchanges is not None:
            completions = exchanges
        else:
            completions = (
                [[{"role": "assistant", "content": t}] for t in texts]
                if prompts and is_conversational(prompts[0])
                else list(texts)
            )
        kwargs = {
            **columns,
            "prompts": list(prompts),
            "completions": completions,
            "completion_ids": completion_ids,
            "trainer_state": state if state is not None else TrainerState(),
            "log_metric": log.log_metric(f"{prefix}/{self.spec.label}"),
            "log_extra": log.log_extra(len(texts), self.who),
            **self.spec.kwargs,
        }
        if not self.takes_all:
            kwargs = {k: v for k, v in kwargs.items() if k in self.names}
        n, timeout = len(texts), self.spec.deadline_s
        if not self.is_async:
            values = self._guarded(user_code.call, self.fn, kwargs, timeout, self.who)
            return lambda: check_rewards(values, n, self.who)
        future = self._guarded(user_code.start, self.fn, kwargs)
        deadline = time.monotonic() + timeout
        return lambda: check_rewards(self._guarded(user_code.wait, future, deadline, timeout, self.who), n, self.who)

    def __call__(self, prompts, texts, completion_ids, columns, **context) -> list[float]:
        return self.start(prompts, texts, completion_ids, columns, **context)()

    def _guarded(self, run, *args):
        """`run(*args)`, with an exception of the user's code as one line naming the function."""
        try:
            return run(*args)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"{self.who} raised {type(e).__name__}: {one_line(e)}") from e


# ---------------------------------------------------------------------------------------------
# Reward servers
# ---------------------------------------------------------------------------------------------


class _Expired(Exception):
    """A request's deadline passed."""


class RemoteReward:
    """A reward server: POST {"prompts": [...], "completions": [...]} -> {"rewards": [...]} (null: no
    finite score).

    Each request has a deadline (`timeout_s`, retries included) on the whole exchange: a watchdog
    closes the connection when it passes, however slowly the server sends. Retried with exponential
    backoff and jitter while the deadline allows: refused or dropped connections, 429 and 503 (after
    their Retry-After), other 5xx. Until the server has answered once it may take `startup_wait_s` to
    accept connections (still loading). Not retried: other 4xx, TLS failures, an unknown host, an
    answer outside the contract. Each failure is one line naming the URL and the cause."""

    def __init__(self, spec: RewardSource):
        self.url, self.who = spec.url, f"reward server {spec.url}"
        parts = urllib.parse.urlsplit(spec.url)
        self.https, self.host, self.port = parts.scheme == "https", parts.hostname, parts.port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout = spec.deadline_s
        self.startup_wait = spec.startup_wait
        self.headers = {"Content-Type": "application/json"}
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise RewardError(
                    f"{self.who}: the environment variable {spec.api_key_env} (api_key_env) is not set: "
                    f"export it with the server's API key"
                )
            self.headers["Authorization"] = f"Bearer {key}"
        self.answered = False  # the server has answered once: no more waiting for it to start
        self.jitter = random.Random()  # its own generator: the run's RNG states stay the run's

    def __call__(self, prompts, texts, completion_ids, columns, **context) -> list[float]:
        body = json.dumps({"prompts": list(prompts), "completions": list(texts)}).encode()
        started = time.monotonic()
        deadline, backoff, attempts, limit = started + self.timeout, BACKOFF_S, 0, f"timeout_s = {self.timeout:g} s"
        while True:
            attempts += 1
            retry_after, refused = None, False
            try:
                status, headers, payload = self._post(body, deadline)
            except _Expired:
                raise RewardError(
                    f"{self.who}: no complete answer within {limit} ({attempts} "
                    f"attempt{'s' * (attempts > 1)}): raise timeout_s, or give the server less to do"
                ) from None
            except ssl.SSLError as e:
                raise RewardError(
                    f"{self.who}: TLS failed ({one_line(e.reason or e)}): check the URL's scheme "
                    f"(http or https) and the server's certificate"
                ) from None
            except socket.gaierror as e:
                raise RewardError(
                    f"{self.who}: cannot resolve the host '{self.host}' ({one_line(e)}): check the URL"
                ) from None
            except (OSError, http.client.HTTPException) as e:
                refused = isinstance(e, ConnectionRefusedError)
                cause = "connection refused" if refused else f"connection failed ({type(e).__name__}: {one_line(e)})"
                if refused and not self.answered:  # a server still starting: wait for it, within its bound
                    if deadline < started + self.startup_wait:
                        limit = f"startup_wait_s = {self.startup_wait:g} s"
                        print(
                            f"{self.who} refuses connections: waiting up to {limit} for it to start",
                            file=sys.stderr,
                            flush=True,
                        )
                        deadline = started + self.startup_wait
            else:
                if status == 200:
                    self.answered = True
                    return self._rewards(payload, len(texts))
                detail = one_line(payload.decode(errors="replace"))[:200]
                cause = f"HTTP {status}" + (f": {detail}" if detail else "")
                if status in (401, 403):
                    fix = (
                        "the key in api_key_env was refused: check it"
                        if "Authorization" in self.headers
                        else "the server wants an API key: set api_key_env to the variable that holds it"
                    )
                    raise RewardError(f"{self.who}: {cause}: {fix}")
                if status != 429 and status < 500:  # the request is wrong: asking again changes nothing
                    raise RewardError(f"{self.who} refused the request ({cause})")
                retry_after = _retry_after(headers.get("Retry-After"))
            wait = retry_after if retry_after is not None else backoff * self.jitter.uniform(0.5, 1.0)
            if time.monotonic() + wait >= deadline:
                waited = time.monotonic() - started
                hint = (
                    "is it running? (`make serve-rm`)"
                    if refused
                    else f"it asked to retry after {retry_after:g} s, past the deadline (timeout_s)"
                    if retry_after is not None
                    else "see the server's log"
                )
                raise RewardError(
                    f"{self.who} failed {attempts} time{'s' * (attempts > 1)} in {waited:.0f} s (last: {cause}): {hint}"
                )
            time.sleep(wait)
            backoff = min(2 * backoff, BACKOFF_MAX_S)

    def _post(self, body: bytes, deadline: float):
        """One POST: (status, headers, body), or _Expired when the deadline passes first."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Expired
        if self.https:
            connection = http.client.HTTPSConnection(
                self.host, self.port, timeout=remaining, context=ssl.create_default_context()
            )
        else:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=remaining)
        expired = threading.Event()

        def expire():  # a socket timeout bounds each read; this bounds them all together
            expired.set()
            sock = connection.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(remaining, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            connection.request("POST", self.path, body, self.headers)
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        except (OSError, http.client.HTTPException) as e:
            if expired.is_set() or isinstance(e, TimeoutError):
                raise _Expired from None
            raise
        finally:
            watchdog.cancel()
            connection.close()

    def _rewards(self, payload: bytes, n: int) -> list[float]:
        try:
            answer = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RewardError(f"{self.who} answered with something that is not JSON") from None
        if not isinstance(answer, dict) or "rewards" not in answer:
            raise RewardError(f"{self.who} answered without a 'rewards' list")
        rewards = check_rewards(answer["rewards"], n, self.who)
        missing = sum(math.isnan(r) for r in rewards)
        if missing and answer.get("non_finite"):
            print(
                f"warning: {self.who} had no finite score for {missing} of {n} completions (they get no reward "
                f"from it): see the server's log",
                file=sys.stderr,
                flush=True,
            )
        return rewards


def _retry_after(value: str | None) -> float | None:
    """A Retry-After header: seconds, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Reward models
# ---------------------------------------------------------------------------------------------


class ModelReward:
    """A frozen sequence classifier, read through `RewardScorer` (the RM stage's own rendering).

    A reward model with the policy's tokenizer and a template that renders turns as prompt ids +
    content ids + a fixed closing (`scoring.turn_closing`, found by `reads_policy_ids`) reads a
    conversational rollout's own ids: the prompt's, the response's up to its stop token, the closing;
    token for token the rendering of its decoded text, without rendering the template and tokenizing
    prompt and response again. A response whose text does not tokenize back to its ids at its place
    in the rendering (a word sampled in pieces, bytes that are no UTF-8, a leading newline that Qwen's
    and Llama 3's pre-tokenizers join with the generation prompt's), an empty one, or one with an
    added or special token inside (decoding may drop it, a template may act on it) is rendered from
    its text, as the reward model was trained; so are plain-text prompts and every response for a
    reward model with its own tokenizer."""

    def __init__(self, scorer: RewardScorer, path: str):
        self.scorer, self.path, self.closing, self.policy_tokenizer = scorer, path, None, False

    def reads_policy_ids(self) -> None:
        """The policy's tokenizer is this reward model's (`run.same_tokenizer`): find the closing."""
        tokenizer, self.policy_tokenizer = self.scorer.tokenizer, True
        self.closing = turn_closing(tokenizer)
        # the tokenizer splits text at its added tokens; a response holding one (special or not: a
        # template may act on a non-special `</think>`) or any special token is rendered from its text
        self.split_at = set(tokenizer.added_tokens_decoder)
        self.inner = torch.tensor(sorted(self.split_at | special_ids(tokenizer)))
        if self.closing is not None:  # the closing's text before the first token it splits at (ChatML's: none)
            n = next((i for i, t in enumerate(self.closing) if t in self.split_at), len(self.closing))
            self.closing_head = (self.closing[:n], self._text(self.closing[:n]))
        self.prompt_tails = {}

    def _text(self, ids: list[int]) -> str:
        return self.scorer.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _prompt_tail(self, ids: list[int]) -> tuple[list[int], str]:
        """The prompt's ids after the last token the tokenizer splits at (ChatML's `assistant\\n`), and
        their text."""
        n = len(ids)
        while n and ids[n - 1] not in self.split_at:
            n -= 1
        tail = tuple(ids[n:])
        if len(tail) > 32:  # a template without added tokens in its generation prompt: the prompt's own text
            return list(tail), self._text(list(tail))
        if tail not in self.prompt_tails:  # a template's generation prompt: one tail for every prompt
            self.prompt_tails[tail] = (list(tail), self._text(list(tail)))
        return self.prompt_tails[tail]

    def __call__(self, prompts, texts, completion_ids, columns, policy_ids=None) -> torch.Tensor:
        if policy_ids is None or self.closing is None or not prompts or not is_conversational(prompts[0]):
            return self.scorer(prompts, texts)
        prompt_ids, responses, mask = policy_ids
        responses, mask = responses.cpu(), mask.cpu().bool()
        inner = torch.isin(responses, self.inner) & mask
        lengths = mask.sum(1)
        stop = inner[torch.arange(len(lengths)), (lengths - 1).clamp(min=0)] & (lengths > 0)
        plain = inner.sum(1) == stop.long()  # no such token before the stop: decoding drops nothing else
        bodies = [row[:n].tolist() for row, n in zip(responses, (lengths - stop.long()).tolist())]
        # Added tokens split a rendering into texts tokenized apart; the response is tokenized with the
        # prompt's ids after the last of them and the closing's before the first. The response's
        # text must give its own ids there: a policy may sample a word in pieces or bytes that are no
        # UTF-8, and pre-tokenizers join whitespace across the seam (Qwen's "\n" + "\n" -> "\n\n").
        # One batched tokenizer call over these short texts, no template.
        tails = [self._prompt_tail(p) for p in prompt_ids]
        head_ids, head_text = self.closing_head
        again = self.scorer.tokenizer(
            [t + text + head_text for (_, t), text in zip(tails, texts)], add_special_tokens=False
        )["input_ids"]
        # (an empty response is rendered too: a template may leave an empty turn out)
        ids = [
            p + body + self.closing
            if ok and body and same == tail + body + head_ids
            else reward_input_ids(self.scorer.tokenizer, prompt, text)
            for p, (tail, _), body, ok, same, prompt, text in zip(
                prompt_ids, tails, bodies, plain.tolist(), again, prompts, texts
            )
        ]
        return self.scorer.score_ids(ids)


# ---------------------------------------------------------------------------------------------
# A set of sources
# ---------------------------------------------------------------------------------------------


def load_sources(
    specs: list[RewardSource],
    model_path: Callable[[str], str],
    dtype: torch.dtype,
    device,
    batch_size: int,
    prepare=lambda model: model,
) -> dict[str, tuple]:
    """{name: (source, weight)}. `model_path` resolves a model source ('rm' -> this run's RM);
    `prepare` readies a frozen model for the engine (pipeline.engine.prepare_frozen)."""
    sources = {}
    for spec in specs:
        if spec.model:
            path = model_path(spec.model)
            model, tokenizer = load_reward_model(path, dtype)
            source = ModelReward(RewardScorer(prepare(model), tokenizer, device, batch_size=batch_size), path)
        elif spec.function:
            source = FunctionReward(spec)
        else:
            source = RemoteReward(spec)
        sources[spec.label] = (source, spec.weight)
    return sources


class Rewards:
    """Named sources with weights; scores a batch with each, and combines them. `rm_label` names the
    source that reads this run's reward model (`{model: rm}`), if any: its score is the one the RM
    stage's reference statistics normalise and the one logged as `rm_score_raw`.

    `watched` sources are a training run's judges. They leave the run's random generators as they
    found them (a judge added or removed changes nothing else in the run). One that fails (a function
    raising or timing out, a server that cannot answer) gives NaN for the batch with a warning line,
    and training goes on; after k failures in a row it rests for the next 2^k - 1 batches (at most 31),
    so that a judge service that is down does not cost each iteration its deadline."""

    def __init__(self, sources: dict[str, tuple], device, rm_label: str | None = None, watched: bool = False):
        self.sources, self.device, self.rm_label, self.watched = sources, device, rm_label, watched
        self.kind = "judges" if watched else "rewards"
        self.log = FunctionLog()  # what the functions logged (trl's log_metric / log_extra), until `take_log`
        self.failed_in_a_row = dict.fromkeys(sources, 0)
        self.resting = dict.fromkeys(sources, 0)  # batches a failing judge still skips

    def __bool__(self) -> bool:
        return bool(self.sources)

    def models(self) -> list[ModelReward]:
        return [s for s, _ in self.sources.values() if isinstance(s, ModelReward)]

    def has_functions(self) -> bool:
        return any(isinstance(s, FunctionReward) for s, _ in self.sources.values())

    def score(
        self,
        prompts: list,
        texts: list[str],
        responses: torch.Tensor | None = None,
        response_mask: torch.Tensor | None = None,
        columns: dict | None = None,
        prompt_ids: list[list[int]] | None = None,
        state: TrainerState | None = None,
        exchanges: list[list[dict]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """{name: (B,) float32 on the device, NaN where the source gave no reward}. `responses` and
        their mask give the functions' `completion_ids` (the response up to and including its stop);
        with `prompt_ids` too, a reward model that reads the policy's ids reads them (ModelReward).
        `state`: the run's progress, for functions that read `trainer_state`. `exchanges`: an agent's
        rollouts as messages, the completions functions get (`FunctionReward.start`).

        Async functions start first and run while the others score. Every source scores the batch even
        after one has failed, so every process runs the same reward-model forwards (collectives under
        sharded engines); then the first failure is raised (a watched source's: a warning)."""
        with _rng_untouched() if self.watched else contextlib.nullcontext():
            results, failures = self._scored(
                prompts, texts, responses, response_mask, columns or {}, prompt_ids, state, exchanges
            )
        for name, e in failures:
            if not self.watched:
                raise e
            self.failed_in_a_row[name] += 1
            self.resting[name] = min(2 ** self.failed_in_a_row[name] - 1, 31)
            print(
                f"warning: {e} (a judge: its score is NaN for this batch and the next {self.resting[name]}; "
                f"training goes on)",
                file=sys.stderr,
                flush=True,
            )
        # a function's floats stay float64 (reported as returned); the reward is summed in float32
        return {
            name: (
                results[name]
                if isinstance(results[name], torch.Tensor)
                else torch.tensor(results[name], dtype=torch.float64)
            ).to(self.device)
            for name in self.sources
        }

    def _scored(self, prompts, texts, responses, response_mask, columns, prompt_ids, state, exchanges=None):
        """({name: scores}, [(name, RewardError)]): every source's scores, NaN for one that failed."""
        ids = None
        if self.has_functions() and responses is not None:
            ids = [row[: int(n)].tolist() for row, n in zip(responses.cpu(), response_mask.sum(1).cpu())]
        policy_ids = (
            (prompt_ids, responses, response_mask) if prompt_ids is not None and responses is not None else None
        )
        results, failures = {}, []

        def attempt(name, run):
            try:
                results[name] = run()
                self.failed_in_a_row[name] = 0
            except RewardError as e:
                failures.append((name, e))
                results[name] = [math.nan] * len(texts)

        order = sorted(self.sources, key=lambda name: not getattr(self.sources[name][0], "is_async", False))
        for name in order:
            source = self.sources[name][0]
            if self.resting[name]:  # a judge that failed lately
                self.resting[name] -= 1
                results[name] = [math.nan] * len(texts)
            elif isinstance(source, FunctionReward):
                attempt(name, lambda: source.start(prompts, texts, ids, columns, state, self.log, self.kind, exchanges))
            elif isinstance(source, ModelReward):
                attempt(name, lambda: source(prompts, texts, ids, columns, policy_ids))
            else:
                attempt(name, lambda: source(prompts, texts, ids, columns))
        for name in order:
            if callable(results[name]):  # a function's pending result
                attempt(name, results[name])
        return results, failures

    def take_log(self) -> FunctionLog:
        """What the functions logged since the last call."""
        log, self.log = self.log, FunctionLog()
        return log

    def total(self, scores: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted sum over sources (a source's missing reward counts 0) and whether each completion
        got a reward from any source."""
        weighted = [self.sources[name][1] * s.float() for name, s in scores.items()]
        if len(weighted) == 1:  # one source: its scores times its weight, bit for bit
            total, valid = weighted[0], ~torch.isnan(weighted[0])
            return torch.where(valid, total, torch.zeros_like(total)), valid
        stacked = torch.stack(weighted)
        return torch.nansum(stacked, 0), ~torch.isnan(stacked).all(0)
