"""A reward model behind HTTP: `make serve-rm` (FastAPI + uvicorn).

    make serve-rm                                  # this run's RM artifact on 127.0.0.1:8000
    make serve-rm RM=path/or/hub-id PORT=8001      # any sequence classifier with one output
    make serve-rm HOST=0.0.0.0                     # reachable from other machines (no authentication!)

POST /score  {"prompts": [...], "completions": [...]}  ->  {"rewards": [...]}
GET  /health ->  {"model": ..., "status": "ok"}

Prompts are strings or message lists, completions strings (or message lists), one per prompt: each pair
is scored exactly as `RewardScorer` scores it locally (the RM stage's own rendering), in batches of
`--batch-size`, one request at a time (a client's `timeout_s` includes its wait behind others). A
malformed request gets a 4xx with its reason and the server stays up. The RL stage
reads it with `ppo.rewards: [{url: "http://127.0.0.1:8000/score"}]` (pipeline/rl/rewards.py).
Bound to 127.0.0.1 unless a host is given: the server has no authentication.
"""

from __future__ import annotations

import argparse
import sys
import threading

from pipeline import cli

if __name__ == "__main__":  # the server's process: before the libraries load
    cli.before_libraries()

import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from pipeline import artifacts, models, plans
from pipeline.config import UserError
from pipeline.scoring import RewardScorer, load_reward_model

Message = dict[str, str]


class ScoreRequest(BaseModel):
    prompts: list[str | list[Message] | None]
    completions: list[str | list[Message]]


def create_app(scorer: RewardScorer, name: str) -> FastAPI:
    app = FastAPI(title="reward model", description=f"scores (prompt, completion) pairs with {name}")
    lock = threading.Lock()  # FastAPI runs plain endpoints on a thread pool: one forward at a time

    @app.get("/health")
    def health():
        return {"model": name, "status": "ok"}

    @app.post("/score")
    def score(request: ScoreRequest):
        if len(request.prompts) != len(request.completions):
            raise HTTPException(400, f"{len(request.prompts)} prompts but {len(request.completions)} completions: "
                                     f"give one prompt per completion")
        if not request.completions:
            return {"rewards": []}
        try:
            with lock:
                rewards = scorer(request.prompts, request.completions)
        except (UserError, ValueError, TypeError, KeyError) as e:  # a pair it cannot render (e.g. no template)
            raise HTTPException(422, f"cannot score this request: {e}") from None
        return {"rewards": rewards.tolist()}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a reward model over HTTP.")
    parser.add_argument("--model", help="a reward model (directory or hub id); default: the recipe's RM artifact")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per forward pass")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    known, rest = parser.parse_known_args(argv)
    recipe, _ = cli.parse("recipe (for the default reward model)", rest)
    path = known.model or plans.reward_model(recipe)
    if known.model is None and not recipe.ppo.reward_model:
        artifacts.require(path, "rm")  # this run's RM stage: "run `make rm` first" if it is missing
    else:
        artifacts.check_model_source(path, "RM" if known.model else "ppo.reward_model")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_reward_model(path, models.resolve_dtype(known.dtype))
    scorer = RewardScorer(model.to(device), tokenizer, device, batch_size=known.batch_size)

    import uvicorn  # only the server needs it

    print(f"serve-rm: {path} on http://{known.host}:{known.port}/score", flush=True)
    uvicorn.run(create_app(scorer, str(path)), host=known.host, port=known.port, log_level="warning")


if __name__ == "__main__":
    cli.run_and_exit(lambda: main(sys.argv[1:]))
