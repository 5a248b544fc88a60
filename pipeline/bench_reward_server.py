"""Load on a reward server (`make serve-rm`): throughput and latency of concurrent clients, and how long
a small request waits while a large one is scored.

    python -m pipeline.bench_reward_server http://127.0.0.1:8000/score                # 16 clients x 20 x 8 pairs
    python -m pipeline.bench_reward_server URL --clients 1 --requests 100 --pairs 64
    python -m pipeline.bench_reward_server URL --behind 4000    # 8 pairs, sent 1 s into a 4,000-pair request

The pairs are the demo's (a film-review prompt, a short review); only the standard library is used, so
any server of the same contract can be measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import urllib.request

PROMPT = [{"role": "user", "content": "how was the plot of star quest ?"}]
REVIEW = "the plot was great and the music was loud ."


def post(url: str, pairs: int, headers: dict) -> float:
    """Seconds one request of `pairs` pairs takes, answer read and checked."""
    body = json.dumps({"prompts": [PROMPT] * pairs, "completions": [REVIEW] * pairs}).encode()
    started = time.monotonic()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(request, timeout=900) as response:
        assert len(json.loads(response.read())["rewards"]) == pairs
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=20, help="per client")
    parser.add_argument("--pairs", type=int, default=8, help="per request")
    parser.add_argument("--behind", type=int, help="instead: one small request sent 1 s into one of this many pairs")
    parser.add_argument("--api-key-env", help="the environment variable holding the server's key")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {os.environ[args.api_key_env]}"} if args.api_key_env else {}
    if args.behind:
        large = {}
        thread = threading.Thread(target=lambda: large.setdefault("s", post(args.url, args.behind, headers)))
        thread.start()
        time.sleep(1.0)
        small = post(args.url, args.pairs, headers)
        thread.join()
        print(
            f"large request ({args.behind} pairs): {large['s']:.2f} s; small one ({args.pairs} pairs, sent 1 s "
            f"later): {small:.2f} s"
        )
        return
    latencies = []

    def client():
        latencies.extend(post(args.url, args.pairs, headers) for _ in range(args.requests))

    started = time.monotonic()
    clients = [threading.Thread(target=client) for _ in range(args.clients)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    wall = time.monotonic() - started
    n = args.clients * args.requests
    print(
        f"{n / wall:.1f} requests/s, {n * args.pairs / wall:.0f} pairs/s; latency median "
        f"{statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms ({args.clients} clients x "
        f"{args.requests} requests x {args.pairs} pairs)"
    )


if __name__ == "__main__":
    main()
