"""Our GRPO and trl's GRPOTrainer on the same work, whole process each, in alternating pairs:

    python -m pipeline.bench_peers SHAPE [--pairs 3] [--layers N] [--lora | --full] [--epochs 1] [--max-new-tokens 128]

The work is stages/recipes/bench-grpo.yaml's on the shape's model (pipeline/bench_shapes.py):
`python -m pipeline.bench` for ours, pipeline/bench_trl_grpo.py for trl's, with the same model,
prompts, reward, k, batch, response length, updates per batch (`--epochs`: our ppo_epochs, trl's
num_iterations) and LoRA or full fine-tuning. Before each run the libraries' files are dropped from
the page cache (posix_fadvise), so neither run starts with the other's imports warm. Wall time and
peak RSS are the kernel's for each child process (wait4), taken alike for both. Writes
data/bench/peers-<shape>-....json: each run's wall time and peak RSS, and the medians of the paired ratios
ours / trl (below 1: ours faster or smaller). Quote ratios from one machine and one run of this.
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
from pipeline.config import load_recipe


def evict_libraries() -> None:
    """Drop site-packages' files from the page cache (a hint the kernel honours for clean pages)."""
    for root, _, files in os.walk(sysconfig.get_paths()["purelib"]):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run(command: list[str], env: dict) -> tuple[float, float, str]:
    """The command's wall time and peak RSS (MB, the kernel's for that process: both sides measured
    alike), and its standard output."""
    evict_libraries()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--full", action="store_true", help="full fine-tuning (default: LoRA r16)")
    parser.add_argument("--epochs", type=int, default=1, help="updates per batch: our ppo_epochs, trl's num_iterations")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--episodes", type=int, default=96)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both (trl's default; ours: off)")
    args = parser.parse_args()

    overrides = bench.shape_inputs(args.shape, args.layers) + [
        f"ppo.finetune={'full' if args.full else 'lora'}", f"ppo.ppo_epochs={args.epochs}",
        f"ppo.max_new_tokens={args.max_new_tokens}", f"ppo.total_episodes={args.episodes}",
        f"ppo.gradient_checkpointing={str(args.gradient_checkpointing).lower()}"]
    recipe = load_recipe(bench.SHAPE_RECIPE, overrides)
    p = recipe.ppo
    model, prompts = p.model, p.prompts.path
    ours = [sys.executable, "-m", "pipeline.bench", "--recipe", bench.SHAPE_RECIPE, *overrides]
    trl = [sys.executable, "-m", "pipeline.bench_trl_grpo", model, prompts, "--iterations", str(p.total_episodes // p.batch_size),
           "--batch", str(p.batch_size), "--k", str(p.samples_per_prompt),
           "--micro-batch", str(p.mini_batch_size // p.gradient_accumulation_steps),
           "--max-new-tokens", str(p.max_new_tokens), "--num-iterations", str(p.ppo_epochs),
           "--learning-rate", str(p.learning_rate), *([] if args.full else ["--lora"]),
           *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())}
    env.pop("SHAPE", None)
    pairs = []
    for i in range(args.pairs):
        order = [("ours", ours), ("trl", trl)] if i % 2 == 0 else [("trl", trl), ("ours", ours)]
        pair = {}
        for name, command in order:
            wall, peak, stdout = run(command, env)
            pair[name] = {"wall_s": round(wall, 1), "peak_rss_mb": round(peak, 1)}
            if name == "ours":
                result = json.loads(Path(f"data/bench/ppo-{recipe.run_name}.json").read_text())
                pair[name]["time_split_s"] = result["time_split_s"]
            else:
                pair[name]["rewards"] = json.loads(stdout.strip().splitlines()[-1])["rewards"]
            print(f"pair {i + 1} {name}: {pair[name]['wall_s']} s, {pair[name]['peak_rss_mb']} MB", flush=True)
        pairs.append(pair)
    ratio = lambda key: statistics.median(p["ours"][key] / p["trl"][key] for p in pairs)  # noqa: E731
    summary = {"shape": args.shape, "layers": args.layers, "finetune": p.finetune, "epochs": args.epochs,
               "gradient_checkpointing": args.gradient_checkpointing,
               "max_new_tokens": p.max_new_tokens, "episodes": p.total_episodes, "pairs": pairs,
               "median_wall_ratio": round(ratio("wall_s"), 3), "median_peak_ratio": round(ratio("peak_rss_mb"), 3),
               "threads": os.cpu_count()}
    out = Path("data/bench") / (f"peers-{args.shape}{f'-{args.layers}l' if args.layers else ''}-{p.finetune}-e{args.epochs}"
                                f"{'-gc' if args.gradient_checkpointing else ''}.json")
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"ours / trl: wall {summary['median_wall_ratio']}, peak RSS {summary['median_peak_ratio']} -> {out}")


if __name__ == "__main__":
    main()
