"""What each stage builds from what, and whether that is already built: the stage graph, defined once.

`upstream(recipe, stage)` names the stages a stage reads, as the recipe wires them (a recipe with
`ppo.model` reads no SFT artifact; one whose rewards read no reward model of its own has no RM stage
before its RL stage). The plans read those artifacts, and `make` runs them first, from this one
definition.

A stage's fingerprint is its recipe section plus the fingerprints of its inputs: data files, the
model it starts from, and the build ids of the upstream artifacts it reads. A finished stage is
skipped when the fingerprint matches; any change to its section, its data or anything upstream
(a re-build included) changes the fingerprint, so that stage and every stage after it run again.

None of this needs torch or trl, so every `make` stage target is one process that walks the chain
(`python -m pipeline.plans STAGE ...`, a fraction of a second when everything is up to date) and
launches only the stages that have something to do, instead of launching each for several seconds
of imports only to learn that it has nothing to do. The stages call the same plans, so the two
cannot disagree.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import artifacts, cli, launch, process, report, user_code
from pipeline.errors import ConfigError
from pipeline.recipe import DatasetSpec, Recipe, RewardSource
from pipeline.recipe_loader import to_dict


@dataclass
class Plan:
    stage: artifacts.StageDir
    fingerprint: str
    config: dict
    """The recipe settings that shape the artifact (recorded in its manifest)."""
    inputs: dict
    """What it is built from (recorded in its manifest, upstream manifests in full)."""
    upstream: dict = field(default_factory=dict)
    """Manifests of the upstream artifacts it reads, by stage name."""
    record: dict = field(default_factory=dict)
    """What the fingerprint is computed from ({config, inputs}): kept in the work directory, so that a
    run resumed under a changed recipe can name the keys that changed (artifacts.StageDir.begin)."""
    safe: tuple[str, ...] = ()
    """The keys of `record` whose change cannot alter the run (`RESUMABLE_ACROSS`)."""


# Recipe keys whose change cannot alter what an interrupted run computed, nor what it goes on to compute
# (beyond float rounding): how often it saves and logs, where it reports, the judges it only watches,
# how long it waits for its rewards and with which key, how it spends memory. An interrupted run resumes
# across them and says which changed (artifacts.StageDir.begin); any other change stops it with one line.
TRAINER_SAFE = (
    "save_steps",
    "save_strategy",
    "save_total_limit",
    "logging_steps",
    "logging_strategy",
    "logging_first_step",
    "report_to",
    "run_name",
    "eval_steps",
    "eval_strategy",
    "per_device_eval_batch_size",
    "gradient_checkpointing",
    "activation_checkpointing",
    "dataloader_num_workers",
)
RESUMABLE_ACROSS = {
    "sft": tuple(f"sft.trainer.{k}" for k in TRAINER_SAFE),
    "rm": tuple(f"rm.trainer.{k}" for k in TRAINER_SAFE),
    "ppo": (
        "ppo.save_every",
        "ppo.sample_every",
        "ppo.report_to",
        "ppo.judges",
        "inputs:ppo.judges:*",
        "ppo.on_divergence",
        "ppo.keep_best",
        "ppo.rewards[*].timeout_s",
        "ppo.rewards[*].startup_wait_s",
        "ppo.rewards[*].api_key_env",
        "ppo.forward_batch_size",
        "ppo.gradient_checkpointing",
        "ppo.remove_padding",
    ),
}


def _plan(run_dir: Path, name: str, config: dict, inputs: dict, upstream: dict | None = None) -> Plan:
    upstream = upstream or {}
    fingerprinted = {**inputs, **{f"{k}_manifest": artifacts.build_id(m) for k, m in upstream.items()}}
    fp = artifacts.fingerprint(config, fingerprinted)
    recorded = {**inputs, **{f"{k}_manifest": m for k, m in upstream.items()}}
    return Plan(
        artifacts.StageDir(run_dir, name),
        fp,
        config,
        recorded,
        upstream,
        record={"config": config, "inputs": fingerprinted},
        safe=RESUMABLE_ACROSS.get(name, ()),
    )


def _datasets(*specs: DatasetSpec | None) -> dict:
    return {spec.path: artifacts.source_fingerprint(spec.path) for spec in specs if spec is not None}


NO_BASE = "base: the recipe starts from '{}', there is no demo base model to build"


def base(recipe: Recipe) -> Plan | None:
    """None when the recipe starts from a model of its own (nothing to build; say NO_BASE)."""
    settings = recipe.base
    if recipe.sft.model != settings.output:
        return None
    out = Path(settings.output)
    return _plan(
        out.parent,
        out.name,
        {"base": to_dict(settings), "seed": recipe.seed},
        {p: artifacts.source_fingerprint(p) for p in settings.corpus},
    )


def sft(recipe: Recipe) -> Plan:
    s = recipe.sft
    if s.model is None:
        raise ConfigError("sft.model is not set: name a hub model id or a local model directory")
    if s.dataset is None:
        raise ConfigError("sft.dataset is not set: name a dataset file or hub dataset id")
    artifacts.check_model_source(s.model, "sft.model")
    return _plan(
        recipe.run_dir,
        "sft",
        {"sft": to_dict(s), "seed": recipe.seed},
        {
            "model": s.model,
            "model_fingerprint": artifacts.source_fingerprint(s.model),
            "datasets": _datasets(s.dataset, s.eval_dataset),
        },
    )


def rm_reference(recipe: Recipe) -> DatasetSpec | None:
    """Responses whose reward mean/std PPO normalises scores by: the SFT data unless set."""
    return recipe.rm.reference_dataset or recipe.sft.dataset


def policy_start(recipe: Recipe) -> str:
    """Where the RL stage starts: ppo.model if set, else this run's SFT artifact."""
    return recipe.ppo.model or str(recipe.run_dir / "sft")


def rm_model(recipe: Recipe) -> str:
    """The model the reward model starts from: rm.model if set, else where the RL stage starts."""
    return recipe.rm.model or policy_start(recipe)


def rm(recipe: Recipe) -> Plan:
    r = recipe.rm
    if r.dataset is None:
        raise ConfigError("rm.dataset is not set: name a preference dataset file or hub dataset id")
    if r.model:
        artifacts.check_model_source(r.model, "rm.model")
    elif recipe.ppo.model:
        artifacts.check_model_source(recipe.ppo.model, "ppo.model", adapter=True)
        if artifacts.adapter_base(recipe.ppo.model) is not None:
            raise ConfigError(
                f"ppo.model '{recipe.ppo.model}' is a PEFT adapter, which the reward model cannot start "
                f"from: set rm.model (its base, or another model)"
            )
    # Artifacts are known by build id, not path, so a run directory can move without re-running.
    return _plan(
        recipe.run_dir,
        "rm",
        {"rm": to_dict(r), "seed": recipe.seed, "judge": recipe.judge},
        {
            "model_fingerprint": artifacts.source_fingerprint(rm_model(recipe)),
            "datasets": _datasets(r.dataset, r.eval_dataset, rm_reference(recipe)),
        },
        read(recipe, "rm"),
    )


def ppo(recipe: Recipe) -> Plan:
    p = recipe.ppo
    if p.prompts is None:
        raise ConfigError("ppo.prompts is not set: name a dataset with a `prompt` column")
    if p.reward_model:
        artifacts.check_model_source(p.reward_model, "ppo.reward_model")
    if p.normalize_scores and not uses_rm_stage(recipe, p.rewards):
        raise ConfigError(
            "ppo.normalize_scores uses the RM stage's reference statistics: it needs a reward "
            "source {model: rm} from this run's RM stage (not ppo.reward_model): set "
            "ppo.normalize_scores=false"
        )
    start = {}
    if p.model:  # (no SFT artifact is read, whatever an earlier run of this name left)
        artifacts.check_model_source(p.model, "ppo.model", adapter=True)
        start = {"model": p.model, "model_fingerprint": artifacts.source_fingerprint(p.model)}
        base = artifacts.adapter_base(p.model)
        if base is not None:  # an adapter: its base's content (or id) too
            start["model_base_fingerprint"] = artifacts.source_fingerprint(base)
    return _plan(
        recipe.run_dir,
        "ppo",
        {"ppo": to_dict(p), "seed": recipe.seed},
        {
            "prompts": _datasets(p.prompts),
            **start,
            **reward_inputs(recipe, p.rewards, "ppo.rewards"),
            **reward_inputs(recipe, p.judges, "ppo.judges"),
            **tool_inputs(p),
        },
        read(recipe, "ppo"),
    )


def tool_inputs(p) -> dict:
    """The tools' and the environment's code (editing a tool re-runs the stage, as a reward function's does)."""
    return {
        f"ppo.tools:{spec}": user_code.fingerprint(spec, p.base_dir, f"ppo tool '{spec}'")
        for spec in p.tools + [p.environment] * bool(p.environment)
    }


def reward_model(recipe: Recipe) -> str:
    """The reward model `{model: rm}` names: ppo.reward_model if set, else the RM stage's."""
    return recipe.ppo.reward_model or str(recipe.run_dir / "rm")


def model_path(recipe: Recipe, model: str) -> str:
    """Where a reward source's `model` is: 'rm' is this run's reward model (`reward_model`)."""
    return reward_model(recipe) if model == "rm" else model


def uses_rm_stage(recipe: Recipe, sources: list[RewardSource]) -> bool:
    """Whether these sources read this run's RM stage (so it must be built first)."""
    return not recipe.ppo.reward_model and any(s.model == "rm" for s in sources)


def needs_rm(recipe: Recipe) -> bool:
    """Whether PPO or eval read this run's RM stage."""
    return uses_rm_stage(recipe, recipe.ppo.rewards + recipe.ppo.judges + recipe.eval.judges)


def reward_inputs(recipe: Recipe, sources: list[RewardSource], section: str) -> dict:
    """What the sources' scores depend on besides the recipe: each reward model's content (or hub id),
    each function's code (pipeline/user_code.py); a server's URL is in the recipe."""
    inputs = {}
    for s in sources:
        if s.model:
            path = model_path(recipe, s.model)
            if s.model != "rm":
                artifacts.check_model_source(path, f"{section} '{s.label}' (model)")
            inputs[f"{section}:{s.label}"] = {"model": path, "fingerprint": artifacts.source_fingerprint(path)}
        elif s.function:  # its file and the local modules it imports (editing a helper re-runs the stage)
            inputs[f"{section}:{s.label}"] = user_code.fingerprint(s.function, s.base_dir, f"{section} '{s.label}'")
    return inputs


def start_label(recipe: Recipe) -> str:
    """What eval calls the policy the RL stage started from: `sft`, or `start` (ppo.model)."""
    return "start" if recipe.ppo.model else "sft"


def eval_policies(recipe: Recipe) -> dict[str, str]:
    """The policies to evaluate, by name: the model SFT started from and SFT (or the RL stage's own
    start, `ppo.model`), then the RL policy once it exists, and the policy at its judges' best
    iteration if it kept one (ppo/best)."""
    run = recipe.run_dir
    policies = {"start": recipe.ppo.model} if recipe.ppo.model else {"base": recipe.sft.model, "sft": str(run / "sft")}
    if artifacts.read_manifest(run / "ppo") is not None:
        policies["ppo"] = str(run / "ppo")
        if (run / "ppo" / "best" / "config.json").is_file():
            policies["best"] = str(run / "ppo" / "best")
    return policies


def eval(recipe: Recipe) -> Plan:
    e = recipe.eval
    if e.prompts is None:
        raise ConfigError("eval.prompts is not set: name a dataset of held-out prompts")
    # the RL policy once it exists (`stages/eval.py` alone evaluates the policies before it)
    upstream = read(recipe, "eval", skip=() if "ppo" in eval_policies(recipe) else ("ppo",))
    sources = eval_sources(recipe)
    # eval stops where PPO's rollouts stopped, in PPO's compute dtype and forward micro-batches
    ppo_settings = {
        "stop_token": recipe.ppo.stop_token,
        "dtype": recipe.ppo.dtype,
        "forward_batch": recipe.ppo.forward_batch,
    }
    return _plan(
        recipe.run_dir,
        "eval",
        {
            "eval": to_dict(e),
            "seed": recipe.seed,
            "judge": recipe.judge,
            "ppo": ppo_settings,
            "sources": to_dict(sources),
        },
        {
            "prompts": _datasets(e.prompts),
            "base_fingerprint": artifacts.source_fingerprint(recipe.ppo.model or recipe.sft.model),
            **reward_inputs(recipe, sources, "eval"),
        },
        upstream,
    )


def eval_sources(recipe: Recipe) -> list[RewardSource]:
    """What eval scores every policy with: the RL stage's rewards, then its judges and eval's own
    (a judge named like an earlier source is that source, scored once)."""
    sources = {}
    for s in recipe.ppo.rewards + recipe.ppo.judges + recipe.eval.judges:
        if s.label in sources and sources[s.label] != s:
            raise ConfigError(
                f"eval.judges: '{s.label}' already names another score of the RL stage: give it a distinct `name`"
            )
        sources.setdefault(s.label, s)
    return list(sources.values())


PLANS = {"base": base, "sft": sft, "rm": rm, "ppo": ppo, "eval": eval}


def upstream(recipe: Recipe, name: str) -> list[str]:
    """The stages `name` reads, as this recipe wires them: the stage graph's one definition (the plans
    read these artifacts, `make` runs these stages first)."""
    p, from_sft = recipe.ppo, recipe.ppo.model is None
    demo_base = lambda model: ["base"] * (model == recipe.base.output)  # noqa: E731 (the demo's base, built here)
    if name == "sft":
        return demo_base(recipe.sft.model)
    if name == "rm":  # (rm_model: rm.model, else where the policy starts)
        return demo_base(recipe.rm.model) if recipe.rm.model else ["sft"] * from_sft + demo_base(p.model)
    start = ["sft"] if from_sft else demo_base(p.model)  # the RL stage's start (and its reference)
    if name == "ppo":
        return start + ["rm"] * uses_rm_stage(recipe, p.rewards + p.judges)
    if name == "eval":  # (its sources: only here, so that a mistake in them is eval's alone)
        return start + ["ppo"] + ["rm"] * uses_rm_stage(recipe, eval_sources(recipe))
    return []


def read(recipe: Recipe, name: str, skip: tuple[str, ...] = ()) -> dict:
    """The manifests of the upstream artifacts `name` reads (the base model is read as a model, by its
    fingerprint): a one-line error naming the stage to run where one is missing."""
    names = [u for u in upstream(recipe, name) if u != "base" and u not in skip]
    return {u: artifacts.require(recipe.run_dir / u, u) for u in names}


def chain(recipe: Recipe, target: str) -> list[str]:
    """`target` and every stage it reads, directly or through another, each after what it reads."""
    order = []

    def visit(name: str) -> None:
        for u in upstream(recipe, name):
            visit(u)
        if name not in order:
            order.append(name)

    visit(target)
    return order


def nothing_to_do(recipe: Recipe, name: str) -> str | None:
    """Why the stage has nothing to do (its artifact is up to date; `base` for a recipe that starts from
    a model of its own: no base to build), or None: it runs. A recipe or an upstream artifact it cannot
    plan from is for the stage itself to report, with its full message: None."""
    try:
        plan = PLANS[name](recipe)
    except (SystemExit, Exception):
        return None
    if plan is None:
        return NO_BASE.format(recipe.sft.model)
    return (
        f"{name}: {plan.stage.final} is up to date (FORCE=1 to re-run)"
        if plan.stage.is_current(plan.fingerprint)
        else None
    )


def run(command: list[str]) -> int:
    """`command`'s exit code, as a shell reports it. Ctrl-C reaches the stage from the terminal (this
    process ignores it: pipeline.launch counts each one); SIGTERM and SIGHUP are passed on to it, and
    this process waits for the stage to save and exit either way."""
    started = []  # the child, once there is one: a signal before it is held for it
    pending = []

    def forward(signum, _):
        (started[0].send_signal(signum) if started else pending.append(signum))

    handlers = {s: signal.signal(s, forward) for s in launch.FORWARDED if s != signal.SIGINT}
    try:
        started.append(subprocess.Popen(command))
        handlers[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # (after Popen: not inherited)
        for signum in pending:
            started[0].send_signal(signum)
        code = started[0].wait()
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return launch.exit_code(code)


def main(argv: list[str]) -> int:
    """`python -m pipeline.plans STAGE [--launch CMD] [--check | --dry-run] [--all] [--report] [--recipe R]
    [--force] [--resume] [overrides]`: what every `make` stage target runs. Walks the chain up to STAGE
    (`chain`) and launches each stage that has something to do: out of date, forced, or reading a stage
    this chain has just rebuilt; says which are up to date. `--force` / `--resume` reach STAGE only
    (every stage with `--all`: `make demo`). `--launch`: the command that starts a stage (accelerate's,
    with make's process settings; `base` runs in this interpreter's Python). `--check`: exit 0 if the
    chain is up to date, 1 if anything would run, running nothing. `--dry-run`: print the commands
    without running them. `--report`: print the evaluation's headline at the end (`make demo`).
    `--upstream-only`: the stages STAGE reads, not STAGE itself, FORCE / RESUME reaching none of them
    (`make bench`: what the RL stage reads)."""
    target = argv[0] if argv else None
    if target not in PLANS:
        raise ConfigError(f"python -m pipeline.plans: name a stage first, one of {', '.join(PLANS)}")
    parser = argparse.ArgumentParser(prog="python -m pipeline.plans", add_help=False, allow_abbrev=False)
    parser.add_argument("--launch", default=f"{sys.executable} -m pipeline.launch --num_processes 1")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--upstream-only", action="store_true")
    ours, rest = parser.parse_known_args(argv[1:])
    recipe, args = cli.parse(f"run what {target} needs", rest)
    stage_args = [a for a in rest if a not in ("--force", "--resume")]
    built = set()
    stages = chain(recipe, target)
    for name in stages[:-1] if ours.upstream_only else stages:
        named = ours.all or (name == target and not ours.upstream_only)
        forced = args.force and named
        if name == "base" and base(recipe) is None:  # a recipe with a model of its own: no base, forced or not
            print(NO_BASE.format(recipe.sft.model))
            continue
        if not forced and not built & set(upstream(recipe, name)):
            done = nothing_to_do(recipe, name)
            if done:
                print(done)
                continue
        if ours.check:
            return 1
        launcher = [sys.executable] if name == "base" else shlex.split(ours.launch)
        flags = ["--force"] * forced + ["--resume"] * (args.resume and named)
        command = [*launcher, f"stages/{name}.py", *flags, *stage_args]
        print(shlex.join(command), flush=True)
        code = 0 if ours.dry_run else run(command)
        if code:
            return code
        built.add(name)
    if ours.report and not (ours.check or ours.dry_run):
        report.main(stage_args)
    return 0


if __name__ == "__main__":
    process.run_and_exit(lambda: sys.exit(main(sys.argv[1:])))
