"""Our RL stage and a peer on the same work, whole process each, in alternating pairs:

    python -m pipeline.bench_peers SHAPE [--pairs 3] [--layers N] [--lora | --full] [--epochs N] [--max-new-tokens N]
    PEER_VENV=DIR python -m pipeline.bench_peers SHAPE --ppo [...]

GRPO (default): stages/recipes/bench-grpo.yaml's work on the shape's model (pipeline/bench_shapes.py),
`python -m pipeline.bench` for ours and pipeline/bench_trl_grpo.py (trl's GRPOTrainer) for the peer,
with the same model, prompts, reward, k, batch, response length, updates per batch (`--epochs`: our
ppo_epochs, trl's num_iterations) and LoRA or full fine-tuning. `--ppo`: stages/recipes/bench-ppo.yaml's
(PPO against a reward model of the same shape) against pipeline/bench_trl_ppo.py, TRL 1.12's
PPOTrainer, which runs in the virtual environment PEER_VENV (trl==1.12.0: pipeline/bench_trl_ppo.py says
how to make it). Before each run both environments' libraries are dropped from the page cache (posix_fadvise), so
neither run starts with imports warm. Wall time and peak RSS are the kernel's for each child process
(wait4), taken alike for both. Writes data/bench/peers-<shape>-....json: each run's wall time and
peak RSS, and the medians of the paired ratios ours / peer (below 1: ours faster or smaller). Quote
ratios from one machine and one run of this.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from pipeline import bench
from pipeline.recipe_loader import load_recipe

PPO_RECIPE = "stages/recipes/bench-ppo.yaml"


def evict_libraries(*roots: str) -> None:
    """Drop the libraries' files (under `roots`, and this interpreter's site-packages) from the page
    cache (a hint the kernel honours for clean pages)."""
    for root, _, files in (walk for r in (sysconfig.get_paths()["purelib"], *roots) for walk in os.walk(r)):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run(command: list[str], env: dict, peer_libraries: list[str]) -> tuple[float, float, str]:
    """The command's wall time and peak RSS (MB, the kernel's for that process: both sides measured
    alike), and its standard output."""
    evict_libraries(*peer_libraries)
    started = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.time() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if child.returncode:
            raise SystemExit(f"bench_peers: {' '.join(command)} failed:\n{err.read()[-3000:]}")
        return wall, usage.ru_maxrss / 1024, out.read()


def peer_python() -> tuple[str, list[str]]:
    """PEER_VENV's interpreter, where TRL 1.12 is installed, and its libraries' directories."""
    venv = os.environ.get("PEER_VENV")
    python = Path(venv or ".") / "bin" / "python"
    found = (
        venv
        and python.is_file()
        and subprocess.run([str(python), "-c", "import trl.experimental.ppo"], capture_output=True).returncode == 0
    )
    if not found:
        raise SystemExit(
            "bench_peers --ppo: set PEER_VENV to a virtual environment with trl==1.12.0 (python3 -m venv "
            "DIR && DIR/bin/pip install torch==2.13.0 && DIR/bin/pip install trl==1.12.0)"
        )
    return str(python), [str(p) for p in Path(venv).glob("lib/python*/site-packages")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape")
    parser.add_argument("--ppo", action="store_true", help="PPO against TRL 1.12's PPOTrainer (default: GRPO, trl's)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None)
    tuning = parser.add_mutually_exclusive_group()
    tuning.add_argument("--full", action="store_true", help="full fine-tuning (default: the recipe's)")
    tuning.add_argument("--lora", action="store_true", help="LoRA r16 (default: the recipe's)")
    parser.add_argument("--epochs", type=int, help="updates per batch: our ppo_epochs, trl's num_iterations")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--episodes", type=int)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both (trl's default; ours: off)")
    args = parser.parse_args()

    recipe_path = PPO_RECIPE if args.ppo else bench.SHAPE_RECIPE
    given = {
        "ppo.finetune": "full" if args.full else "lora" if args.lora else None,
        "ppo.ppo_epochs": args.epochs,
        "ppo.max_new_tokens": args.max_new_tokens,
        "ppo.total_episodes": args.episodes,
    }
    overrides = bench.shape_inputs(args.shape, args.layers, recipe_path) + [
        *(f"{k}={v}" for k, v in given.items() if v is not None),
        f"ppo.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
    ]
    recipe = load_recipe(recipe_path, overrides)
    p = recipe.ppo
    ours = [sys.executable, "-m", "pipeline.bench", "--recipe", recipe_path, *overrides]
    peer_libraries = []
    if args.ppo:
        if p.finetune != "full" or args.gradient_checkpointing:
            raise SystemExit("bench_peers --ppo: the PPO peer runs full fine-tuning without gradient checkpointing")
        python, peer_libraries = peer_python()
        peer = [
            python,
            "pipeline/bench_trl_ppo.py",
            p.model,
            p.reward_model,
            p.prompts.path,
            "--episodes",
            str(p.total_episodes),
            "--batch",
            str(p.batch_size),
            "--mini-batch",
            str(p.mini_batch_size),
            "--forward-batch",
            str(p.forward_batch_size),
            "--epochs",
            str(p.ppo_epochs),
            "--max-new-tokens",
            str(p.max_new_tokens),
            "--temperature",
            str(p.temperature),
            "--kl-coef",
            str(p.kl_coef),
            "--missing-stop-penalty",
            str(p.stop_penalty),
            "--learning-rate",
            str(p.learning_rate),
        ]
    else:
        peer = [
            sys.executable,
            "-m",
            "pipeline.bench_trl_grpo",
            p.model,
            p.prompts.path,
            "--iterations",
            str(p.total_episodes // p.batch_size),
            "--batch",
            str(p.batch_size),
            "--k",
            str(p.samples_per_prompt),
            "--micro-batch",
            str(p.mini_batch_size // p.gradient_accumulation_steps),
            "--max-new-tokens",
            str(p.max_new_tokens),
            "--num-iterations",
            str(p.ppo_epochs),
            "--learning-rate",
            str(p.learning_rate),
            *(["--lora"] if p.finetune == "lora" else []),
            *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())}
    env.pop("SHAPE", None)
    pairs = []
    for i in range(args.pairs):
        order = [("ours", ours), ("peer", peer)] if i % 2 == 0 else [("peer", peer), ("ours", ours)]
        pair = {}
        for name, command in order:
            wall, peak, stdout = run(command, env, peer_libraries)
            pair[name] = {"wall_s": round(wall, 1), "peak_rss_mb": round(peak, 1)}
            if name == "ours":
                result = json.loads(Path(f"data/bench/ppo-{recipe.run_name}.json").read_text())
                pair[name]["time_split_s"] = result["time_split_s"]
            else:
                reported = json.loads(stdout.strip().splitlines()[-1])
                pair[name]["rewards"] = reported.get("rewards", reported.get("scores"))
            print(f"pair {i + 1} {name}: {pair[name]['wall_s']} s, {pair[name]['peak_rss_mb']} MB", flush=True)
        pairs.append(pair)
    ratio = lambda key: statistics.median(p["ours"][key] / p["peer"][key] for p in pairs)  # noqa: E731
    summary = {
        "shape": args.shape,
        "peer": "TRL 1.12 PPOTrainer" if args.ppo else "trl GRPOTrainer",
        "layers": args.layers,
        "finetune": p.finetune,
        "epochs": p.ppo_epochs,
        "gradient_checkpointing": args.gradient_checkpointing,
        "max_new_tokens": p.max_new_tokens,
        "episodes": p.total_episodes,
        "pairs": pairs,
        "median_wall_ratio": round(ratio("wall_s"), 3),
        "median_peak_ratio": round(ratio("peak_rss_mb"), 3),
        "threads": os.cpu_count(),
    }
    out = Path("data/bench") / (
        f"peers-{'ppo' if args.ppo else 'grpo'}-{args.shape}{f'-{args.layers}l' if args.layers else ''}"
        f"-{p.finetune}-e{p.ppo_epochs}{'-gc' if args.gradient_checkpointing else ''}.json"
    )
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"ours / peer: wall {summary['median_wall_ratio']}, peak RSS {summary['median_peak_ratio']} -> {out}")


if __name__ == "__main__":
    main()
