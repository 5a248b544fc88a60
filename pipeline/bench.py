"""PPO benchmark: `make bench [RECIPE=...] [BENCH_EPISODES=N] [SHAPE=...]` -> data/bench/ppo-<run>.json.

Runs the RL stage of a recipe (default: the demo) for a fixed budget of episodes, in a scratch run
directory that links this run's SFT and RM artifacts (the run's own PPO artifact is not touched),
as a separate process timed from launch to exit. Writes one JSON: episodes/s and generated tokens/s
(training time only, and median over iterations), the time split (start-up with imports and model
loading, generate, score, optimise, saving), and peak memory (CUDA allocator peak on a GPU, peak RSS
on a CPU). Quote ratios between runs on the same machine only.

With SHAPE (pipeline/bench_shapes.py: smollm2-135m, qwen2.5-0.5b; BENCH_LAYERS to cut the layer
count), the work is stages/recipes/bench-grpo.yaml's on a model of that real shape with random
weights and prompts of RLVR lengths (built once into data/bench/models/), from `ppo.model`: no SFT
or RM stage -> data/bench/ppo-bench-grpo-<shape>.json. RECIPE=stages/recipes/bench-ppo.yaml: PPO against
a reward model of the same shape instead -> data/bench/ppo-bench-ppo-<shape>.json.
`python -m pipeline.bench_peers` compares them with trl.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline import artifacts, cli, plans, process
from pipeline.recipe_loader import load_recipe

SHAPE_RECIPE = "stages/recipes/bench-grpo.yaml"


def shape_inputs(shape: str, layers: int | None, recipe: str = SHAPE_RECIPE) -> list[str]:
    """The shape's model and prompts (built once, kept under data/bench/models/) for `recipe`'s work, as
    recipe overrides, and its run name (the recipe's, then the shape's); where the recipe reads a reward
    model (`rm`), one of the same shape (`ppo.reward_model`).
    Every prompt has 150 words (the middle of an RLVR prompt's 100-200): ours and a peer draw different
    prompts, and the same length makes that the same work."""
    from pipeline import bench_shapes

    work = load_recipe(recipe)
    reward_model = plans.needs_rm(work)
    name = f"{shape}-{layers}l" if layers else shape
    model, prompts = BENCH_MODELS / name, BENCH_MODELS / f"{name}-prompts-150.jsonl"
    for path, reward in ((model, False), (model.with_name(f"{name}-rm"), True))[: 1 + reward_model]:
        if not (path / "config.json").is_file():
            print(f"bench: building {path.name} (random weights) in {path}")
            bench_shapes.build(shape, path.with_name(path.name + ".tmp"), layers, reward_model=reward)
            path.with_name(path.name + ".tmp").rename(path)
    if not prompts.is_file():
        bench_shapes.prompts(prompts, 256, bench_shapes.SHAPES[shape]["vocab_size"], lengths=(150, 150))
    return [
        f"ppo.model={model}",
        f"ppo.prompts={prompts}",
        f"run_name={work.run_name}-{name}",
        *([f"ppo.reward_model={model.with_name(f'{name}-rm')}"] if reward_model else []),
    ]


BENCH_MODELS = Path("data/bench/models")


def main(argv: list[str]) -> None:
    episodes, shape = os.environ.get("BENCH_EPISODES"), os.environ.get("SHAPE")
    layers = int(os.environ["BENCH_LAYERS"]) if os.environ.get("BENCH_LAYERS") else None
    if shape:
        argv = [*([] if "--recipe" in argv else ["--recipe", SHAPE_RECIPE]), *argv]
        argv += shape_inputs(shape, layers, argv[argv.index("--recipe") + 1])
    recipe, args = cli.parse(__doc__.splitlines()[0], argv)
    upstream = [u for u in plans.upstream(recipe, "ppo") if u != "base"]  # what the RL stage reads
    for stage in upstream:
        artifacts.require(recipe.run_dir / stage, stage)
    overrides = args.overrides
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        run = Path(tmp) / recipe.run_name
        run.mkdir()
        for stage in upstream:
            (run / stage).symlink_to((recipe.run_dir / stage).resolve())
        command = [
            sys.executable,
            "stages/ppo.py",
            "--recipe",
            args.recipe,
            *overrides,
            f"runs_dir={tmp}",
            *([f"ppo.total_episodes={episodes}"] if episodes else []),
            "ppo.report_to=[]",
        ]
        started = time.time()
        subprocess.run(command, check=True)
        wall = time.time() - started
        manifest = artifacts.read_manifest(run / "ppo")
    m, split = manifest["metrics"], manifest["metrics"]["time_split_s"]
    training = split["generate"] + split["score"] + split["optimise"]
    result = {
        "recipe": args.recipe,
        "overrides": overrides,
        "episodes": m["episodes"],
        "iterations": m["iterations"],
        "episodes_per_s": round(m["episodes"] / training, 2),
        "episodes_per_s_median": round(m["episodes_per_s_median"], 2),
        "generated_tokens_per_s_median": round(m["tokens_per_s_median"], 1),
        "time_split_s": {
            "startup": round(wall - manifest["duration_s"] + split["startup"], 1),
            **{k: split[k] for k in ("generate", "score", "optimise", "saving")},
        },
        "wall_s": round(wall, 1),
        "peak_memory_mb": m["peak_memory_mb"],
        "trainable_parameters": m["trainable_parameters"],
        "parameters": m["parameters"],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), **_device()},
    }
    out = Path("data/bench") / f"ppo-{recipe.run_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"bench: written to {out}")


def _device() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    return {"device": "cpu", "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


if __name__ == "__main__":
    process.run_and_exit(lambda: main(sys.argv[1:]))
