"""Tools an agent policy calls in its rollouts: loading them, describing them to the chat template,
reading the calls out of a reply, running them, and the tokens their results add to the exchange.

- A tool is a Python function with type hints and a docstring that describes each argument (what
  `transformers.utils.get_json_schema` reads, as trl and the chat templates take tools), named like
  a reward function (`package.module:name` or `path/to/file.py:name`, pipeline/user_code.py).
- An environment is a class named the same way: one instance per rollout, `reset(**row)` gets the
  prompt's dataset row (a string it returns is appended to the prompt), and its public methods are
  that rollout's tools (trl's `environment_factory` contract).
- Calls are read in the model family's format: the tokenizer's own response parser where it has one
  (`response_template`, transformers 5), else Qwen2.5 / Hermes `<tool_call>{json}</tool_call>` blocks
  or a Llama 3.1 JSON reply `{"name": ..., "parameters": {...}}`.
- A call never crashes the run: an unknown tool, bad arguments, an exception, a call past its
  deadline or a malformed call becomes an error message the model reads as the tool's result. (A call
  stuck in C code that never returns to Python cannot be interrupted: pipeline/user_code.py's `call`
  ends the process then, saying why.) A rollout's calls run in the order the model wrote them. The
  turns of the batch whose calls are all async (`async def`, on the process's event loop) run
  together; plain functions run one after another in the main thread, each bounded by
  `tool_timeout_s`: write a slow tool (a search, a code runner behind a server) as an async function.
- The result's tokens are what the template writes after the model's turn (the tool messages and the
  next assistant header), found by rendering a small conversation with and without them (trl's way):
  the model's own tokens are never re-tokenised.

Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline import user_code
from pipeline.errors import ConfigError, RewardError
from pipeline.user_code import one_line

HERMES_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
LLAMA_PYTHON_TAG = "<|python_tag|>"


@dataclass
class Call:
    """One tool call read from a reply: a name and its arguments, or why it could not be read."""

    name: str | None
    arguments: dict[str, Any] = field(default_factory=dict)
    malformed: str | None = None

    def message(self) -> dict:
        """The call as the assistant message's `tool_calls` entry (transformers' chat format)."""
        return {"type": "function", "function": {"name": self.name or "unknown", "arguments": self.arguments}}


def _call_of(data: Any, arguments_key: str = "arguments") -> Call:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return Call(None, malformed="a tool call needs a JSON object with a string 'name'")
    arguments = data.get(arguments_key, data.get("arguments", data.get("parameters", {})))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return Call(data["name"], malformed=f"the arguments of '{data['name']}' are not a JSON object")
    return Call(data["name"], arguments)


def parse_reply(text: str, tokenizer=None) -> tuple[str, list[Call]]:
    """A reply's text without its calls, and its calls (none: the answer). `text` is the turn's
    tokens decoded with the special ones kept, the stop token removed."""
    if tokenizer is not None and getattr(tokenizer, "response_template", None):
        try:
            parsed = tokenizer.parse_response(text, prefix="")
        except Exception as e:  # (transformers raises ValueError mostly; any failure is the model's text)
            return text, [Call(None, malformed=f"the reply could not be parsed ({one_line(e)})")]
        calls = [_call_of(c.get("function", c)) for c in parsed.get("tool_calls") or []]
        return parsed.get("content") or "", calls
    blocks = HERMES_CALL.findall(text)
    if blocks:
        calls = []
        for block in blocks:
            try:
                calls.append(_call_of(json.loads(block)))
            except json.JSONDecodeError as e:
                calls.append(Call(None, malformed=f"the tool call is not valid JSON ({e.msg} at {e.pos})"))
        return HERMES_CALL.sub("", text).strip(), calls
    stripped = text.strip().removeprefix(LLAMA_PYTHON_TAG).strip()
    if stripped.startswith("{") and stripped.endswith("}"):  # Llama 3.1: the whole reply is one JSON call
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError:
            return text, []
        if isinstance(data, dict) and "name" in data and ("parameters" in data or "arguments" in data):
            return "", [_call_of(data, "parameters")]
    return text, []


def schema(fn: Callable, who: str) -> dict:
    """The tool's JSON schema, as chat templates read it (from its type hints and docstring)."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as e:  # transformers' DocstringParsingException, TypeHintParsingException
        raise ConfigError(
            f"{who}: {one_line(e)} (a tool needs type hints and a docstring that describes each argument under 'Args:')"
        ) from None


def _methods(cls: type) -> list[str]:
    """An environment's tools: its public methods but `reset` and `get_reward` (trl's rule)."""
    return [
        name
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_") and name not in ("reset", "get_reward")
    ]


class Toolbox:
    """The run's tools and environment: `schemas` for the prompt, `start` for each rollout."""

    def __init__(self, specs: list[str], environment: str | None, base_dir: str | None, timeout_s: float):
        self.functions = {}
        for spec in specs:
            fn = user_code.load(spec, base_dir, f"tool '{spec}'")
            name = getattr(fn, "__name__", None)
            if not name or name in self.functions:
                raise ConfigError(
                    f"tool '{spec}': "
                    + (
                        f"two tools are named {name}: rename one"
                        if name
                        else "name a function (the model calls it by its __name__)"
                    )
                )
            self.functions[name] = fn
        self.environment, self.timeout_s = None, timeout_s
        if environment:
            self.environment = user_code.load(environment, base_dir, f"environment '{environment}'")
            if not inspect.isclass(self.environment) or not callable(getattr(self.environment, "reset", None)):
                raise ConfigError(f"environment '{environment}': name a class with a reset(**row) method")
            self.methods = _methods(self.environment)
            if not self.methods:
                raise ConfigError(f"environment '{environment}' has no public methods to offer as tools")
            clash = set(self.methods) & set(self.functions)
            if clash:
                raise ConfigError(
                    f"environment '{environment}' and ppo.tools both have a tool named {sorted(clash)[0]}: rename one"
                )
        self.schemas = [schema(fn, f"tool '{name}'") for name, fn in self.functions.items()]
        if self.environment is not None:
            self.schemas += [
                schema(getattr(self.environment, name), f"environment method '{name}'") for name in self.methods
            ]

    @property
    def names(self) -> list[str]:
        return [s["function"]["name"] for s in self.schemas]

    def start(self, row: dict) -> tuple[Any, dict[str, Callable], str | None]:
        """One rollout's environment (None without one), its tools by name, and what `reset` returned
        to append to the prompt (None: nothing)."""
        if self.environment is None:
            return None, self.functions, None
        who = f"environment '{self.environment.__name__}'"
        try:
            env = self.environment()
            observation = user_code.call(env.reset, row, self.timeout_s, f"{who}'s reset")
        except RewardError:
            raise
        except Exception as e:  # a reset that takes other arguments, or fails
            raise RewardError(
                f"{who}: creating it or reset(**row) raised {type(e).__name__}: {one_line(e)} "
                f"(reset gets the prompt's dataset row as keyword arguments: accept **row)"
            ) from None
        return env, {**self.functions, **{name: getattr(env, name) for name in self.methods}}, observation

    def run(self, turns: list[list[tuple[Call, dict[str, Callable]]]]) -> list[list[tuple[dict, bool]]]:
        """For each rollout's turn, its calls (each with the rollout's tools): the tool messages and
        whether each call failed, in the order the model wrote them (a call sees what the one before it
        did to its environment). Every failure is a message to the model. Turns whose calls are all to
        async tools run together on the event loop, each call with its own deadline; the others' calls
        run one after another in this thread, where the deadline's signal can reach a plain function."""
        together, t0 = {}, time.monotonic()
        for i, jobs in enumerate(turns):
            tools = [None if call.malformed else available.get(call.name) for call, available in jobs]
            if jobs and all(fn is not None and user_code.is_async(fn) for fn in tools):
                together[i] = user_code.start(self._in_order, {"jobs": jobs})
        out = []
        for i, jobs in enumerate(turns):
            if i not in together:
                out.append([self._result(call, available) for call, available in jobs])
                continue
            try:  # (each call is bounded inside; this only guards against a loop that never answers)
                out.append(user_code.wait(together[i], t0 + len(jobs) * self.timeout_s + 1, self.timeout_s, "tools"))
            except RewardError as e:
                out.append([_failed(call.name, e) for call, _ in jobs])
        return out

    async def _in_order(self, jobs: list[tuple[Call, dict[str, Callable]]]) -> list[tuple[dict, bool]]:
        """One turn's async calls, one after another, each bounded by `tool_timeout_s`."""
        out = []
        for call, tools in jobs:
            try:
                result = await asyncio.wait_for(tools[call.name](**call.arguments), self.timeout_s)
            except asyncio.TimeoutError:
                out.append(_failed(call.name, RewardError(user_code.late(f"tool '{call.name}'", self.timeout_s))))
            except Exception as e:
                out.append(_failed(call.name, e))
            else:
                out.append(_answered(call.name, result))
        return out

    def _result(self, call: Call, tools: dict[str, Callable]) -> tuple[dict, bool]:
        name = call.name or "unknown"
        if call.malformed:
            return _tool_message(name, f"error: {call.malformed}"), True
        fn = tools.get(call.name)
        if fn is None:
            return _tool_message(
                name, f"error: there is no tool named '{call.name}' (the tools are: {', '.join(sorted(tools))})"
            ), True
        try:
            if user_code.is_async(fn):
                future = user_code.start(fn, call.arguments)
                result = user_code.wait(future, time.monotonic() + self.timeout_s, self.timeout_s, f"tool '{name}'")
            else:
                result = user_code.call(fn, call.arguments, self.timeout_s, f"tool '{name}'")
        except Exception as e:
            return _failed(name, e)
        return _answered(name, result)


def _answered(name: str, result) -> tuple[dict, bool]:
    return _tool_message(name, result if isinstance(result, str) else json.dumps(result, default=str)), False


def _failed(name: str, e: Exception) -> tuple[dict, bool]:
    """A failed call as the model reads it: past its deadline (RewardError), bad arguments (TypeError,
    mostly), or the tool's own exception."""
    if isinstance(e, RewardError):
        return _tool_message(name, f"error: {e}"), True
    if isinstance(e, TypeError):
        return _tool_message(name, f"error: {one_line(e)}"), True
    return _tool_message(name, f"error: {type(e).__name__}: {one_line(e)}"), True


def _tool_message(name: str, content: str) -> dict:
    return {"role": "tool", "name": name, "content": content}


def check_template(tokenizer, schemas: list[dict]) -> None:
    """The chat template renders tools, a call and its result; a one-line error naming what to change
    where it does not (a template that ignores them would train a model on calls it never saw)."""
    name = schemas[0]["function"]["name"]
    conversation = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [Call(name, {"x": "CALL_MARK"}).message()]},
        {"role": "tool", "name": name, "content": "RESULT_MARK"},
    ]
    try:
        text = tokenizer.apply_chat_template(conversation, tools=schemas, tokenize=False)
    except Exception as e:
        text = f"({one_line(e)})"
    if "RESULT_MARK" not in text or "CALL_MARK" not in text:
        raise ConfigError(
            "ppo.tools: the policy's chat template does not render tools, tool calls and their "
            "results: use a model whose template does (Qwen2.5, Llama 3.1 and later instruct "
            "models), or set one with a template that does"
        )


def result_ids(tokenizer, tool_messages: list[dict], turn_end: str) -> list[int]:
    """The tokens the template writes after a model's turn that ended with `turn_end` (its stop token's
    text) and before its next turn: the rest of the template's turn ending, the tool messages and the
    assistant header. From a small conversation rendered with and without them."""
    call = [Call(m["name"], {}).message() for m in tool_messages]
    before = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": call}]
    head = tokenizer.apply_chat_template(before, tokenize=False)
    full = tokenizer.apply_chat_template(before + tool_messages, tokenize=False, add_generation_prompt=True)
    if not full.startswith(head):
        raise ConfigError(
            "ppo.tools: the chat template renders a conversation's start differently once tool "
            "results follow, so the results cannot be appended to the model's tokens: use a "
            "template that keeps earlier turns as they are"
        )
    end = head.rfind(turn_end)
    tail = head[end + len(turn_end) :] if end >= 0 else ""
    return tokenizer(tail + full[len(head) :], add_special_tokens=False)["input_ids"]
