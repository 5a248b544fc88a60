"""Where rewards come from: reward models, Python functions, reward servers; and judges.

`ppo.rewards` lists the sources the policy optimises (their weighted sum); `ppo.judges` and
`eval.judges` list sources that are only watched. Every source scores a batch the same way:

    source(prompts, texts, completion_ids, columns) -> (B,) float32, NaN where it gives no reward

- `ModelReward`: a sequence classifier read through `RewardScorer`, exactly as the RM stage trained it.
- `FunctionReward`: trl's reward-function contract (`GRPOTrainer._calculate_rewards`), so functions
  written for trl work unchanged: called by keyword with `prompts`, `completions` (strings, or
  `[{"role": "assistant", "content": ...}]` when the prompts are conversations), `completion_ids`,
  every other column of the prompt dataset (one value per completion), and the source's `kwargs`;
  returns a float or None per completion. A function without `**kwargs` gets only the arguments it
  names (a classic crash with trl: `def f(prompts, completions)` meeting `completion_ids`).
- `RemoteReward`: POST {"prompts", "completions"} to a server (`make serve-rm`, pipeline/rl/
  reward_server.py) that answers {"rewards"}; bounded retries with backoff on connection errors,
  timeouts and 5xx, then one line naming the URL and the last status. Never a silent 0.

A completion with no reward (None) from a source is left out of that source's mean; one with no reward
from any source gets advantage 0 (`Rewards.total`).
"""

from __future__ import annotations

import asyncio
import http.client
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import torch

from pipeline.config import RewardSource, UserError, importable_from_cwd
from pipeline.data import is_conversational
from pipeline.models import special_ids
from pipeline.scoring import RewardScorer, load_reward_model, reward_input_ids, turn_closing

RETRIES = 4  # attempts per request to a reward server
BACKOFF_S = 0.5  # doubled after each failed attempt: 0.5 + 1 + 2 s before giving up


class RewardError(UserError):
    """A reward source that failed, or returned something that is not one reward per completion. It
    may happen on one process only, so every process that meets one says so (pipeline.cli)."""

    on_one_rank = True


# ---------------------------------------------------------------------------------------------
# Functions
# ---------------------------------------------------------------------------------------------

def load_function(spec: str) -> Callable:
    """'package.module:name' or 'path/file.py:name' -> the function, or one line saying what is wrong."""
    module, _, name = spec.rpartition(":")
    try:
        if module.endswith(".py"):
            if not Path(module).is_file():
                raise RewardError(f"reward function '{spec}': file '{module}' not found")
            loaded = importlib.util.spec_from_file_location(Path(module).stem, module)
            mod = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(mod)
        else:
            importable_from_cwd()
            mod = importlib.import_module(module)
    except ImportError as e:
        raise RewardError(f"reward function '{spec}': cannot import '{module}' ({one_line(e)})") from None
    except Exception as e:  # a syntax error, or a module that fails while importing
        raise RewardError(f"reward function '{spec}': importing '{module}' raised {type(e).__name__}: "
                          f"{one_line(e)}") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise RewardError(f"reward function '{spec}': '{module}' has no function '{name}'")
    return fn


def one_line(e) -> str:
    return " ".join(str(e).split())


def check_rewards(values, n: int, who: str) -> list[float]:
    """One float per completion (None -> NaN), or one line naming `who` and the first bad index."""
    if hasattr(values, "tolist"):  # a tensor or numpy array
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"{who} returned {type(values).__name__}; it must return a list of {n} floats "
                          f"(or None), one per completion")
    if len(values) != n:
        raise RewardError(f"{who} returned {len(values)} rewards for {n} completions (one per completion, "
                          f"None to give none)")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
        elif isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):  # numpy scalars are Real
            raise RewardError(f"{who} returned {v!r} at index {i}: a reward is a finite number (None: no reward)")
        else:
            out.append(float(v))
    return out


class FunctionReward:
    """A Python reward function with trl's contract (see the module docstring)."""

    def __init__(self, spec: RewardSource):
        self.spec, self.fn = spec, load_function(spec.function)
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):  # a callable without a signature: give it everything
            params = {"kwargs": inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)}
        self.takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.names = set(params)

    def __call__(self, prompts, texts, completion_ids, columns) -> list[float]:
        completions = ([[{"role": "assistant", "content": t}] for t in texts]
                       if prompts and is_conversational(prompts[0]) else list(texts))
        kwargs = {**columns, "prompts": list(prompts), "completions": completions, "completion_ids": completion_ids,
                  **self.spec.kwargs}
        if not self.takes_all:
            kwargs = {k: v for k, v in kwargs.items() if k in self.names}
        who = f"reward function '{self.spec.function}'"
        try:
            values = self.fn(**kwargs)
            if inspect.isawaitable(values):
                values = asyncio.run(values)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"{who} raised {type(e).__name__}: {one_line(e)}") from e
        return check_rewards(values, len(texts), who)


# ---------------------------------------------------------------------------------------------
# Reward servers
# ---------------------------------------------------------------------------------------------

class RemoteReward:
    """A reward server: POST {"prompts": [...], "completions": [...]} -> {"rewards": [...]}."""

    def __init__(self, spec: RewardSource):
        self.url, self.timeout = spec.url, spec.timeout_s

    def __call__(self, prompts, texts, completion_ids, columns) -> list[float]:
        body = json.dumps({"prompts": list(prompts), "completions": list(texts)}).encode()
        last = "no answer"
        for attempt in range(RETRIES):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    answer = json.loads(response.read())
                break
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {one_line(e.read().decode(errors='replace'))[:200]}"
                if e.code < 500:  # the request is wrong: asking again changes nothing
                    raise RewardError(f"reward server {self.url} refused the request ({last})") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
                last = one_line(getattr(e, "reason", e))
            except json.JSONDecodeError:
                raise RewardError(f"reward server {self.url} answered with something that is not JSON") from None
        else:
            hint = "see the server's log" if last.startswith("HTTP") else "is it running? (`make serve-rm`)"
            raise RewardError(f"reward server {self.url} failed {RETRIES} times (last: {last}): {hint}")
        if not isinstance(answer, dict) or "rewards" not in answer:
            raise RewardError(f"reward server {self.url} answered without a 'rewards' list")
        return check_rewards(answer["rewards"], len(texts), f"reward server {self.url}")


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
        again = self.scorer.tokenizer([t + text + head_text for (_, t), text in zip(tails, texts)],
                                      add_special_tokens=False)["input_ids"]
        # (an empty response is rendered too: a template may leave an empty turn out)
        ids = [p + body + self.closing if ok and body and same == tail + body + head_ids
               else reward_input_ids(self.scorer.tokenizer, prompt, text)
               for p, (tail, _), body, ok, same, prompt, text in
               zip(prompt_ids, tails, bodies, plain.tolist(), again, prompts, texts)]
        return self.scorer.score_ids(ids)


# ---------------------------------------------------------------------------------------------
# A set of sources
# ---------------------------------------------------------------------------------------------

def load_sources(specs: list[RewardSource], model_path: Callable[[str], str], dtype: torch.dtype, device,
                 batch_size: int, prepare=lambda model: model) -> dict[str, tuple]:
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
    stage's reference statistics normalise and the one logged as `rm_score_raw`."""

    def __init__(self, sources: dict[str, tuple], device, rm_label: str | None = None):
        self.sources, self.device, self.rm_label = sources, device, rm_label

    def __bool__(self) -> bool:
        return bool(self.sources)

    def models(self) -> list[ModelReward]:
        return [s for s, _ in self.sources.values() if isinstance(s, ModelReward)]

    def score(self, prompts: list, texts: list[str], responses: torch.Tensor | None = None,
              response_mask: torch.Tensor | None = None, columns: dict | None = None,
              prompt_ids: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
        """{name: (B,) float32 on the device, NaN where the source gave no reward}. `responses` and
        their mask give the functions' `completion_ids` (the response up to and including its stop);
        with `prompt_ids` too, a reward model that reads the policy's ids reads them (ModelReward)."""
        ids = None
        if any(isinstance(s, FunctionReward) for s, _ in self.sources.values()) and responses is not None:
            ids = [row[: int(n)].tolist() for row, n in zip(responses.cpu(), response_mask.sum(1).cpu())]
        out = {}
        policy_ids = (prompt_ids, responses, response_mask) if prompt_ids is not None and responses is not None else None
        for name, (source, _) in self.sources.items():
            if isinstance(source, ModelReward):
                values = source(prompts, texts, ids, columns or {}, policy_ids)
            else:
                values = source(prompts, texts, ids, columns or {})
            # a function's floats stay float64 (reported as returned); the reward is summed in float32
            out[name] = (values if isinstance(values, torch.Tensor)
                         else torch.tensor(values, dtype=torch.float64)).to(self.device)
        return out

    def total(self, scores: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted sum over sources (a source's missing reward counts 0) and whether each completion
        got a reward from any source."""
        weighted = [self.sources[name][1] * s.float() for name, s in scores.items()]
        if len(weighted) == 1:  # one source: its scores times its weight, bit for bit
            total, valid = weighted[0], ~torch.isnan(weighted[0])
            return torch.where(valid, total, torch.zeros_like(total)), valid
        stacked = torch.stack(weighted)
        return torch.nansum(stacked, 0), ~torch.isnan(stacked).all(0)

