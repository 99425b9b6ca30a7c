"""Resident memory of `shimmy serve` on the demo model after one request.

    .venv/bin/python bench/serve_memory.py [--runs 3] [-- SERVE ARGS...]

Starts `shimmy serve --model DEMO --no-demo --no-cache [SERVE ARGS]` with its own
SHIMMY_HOME, sends one 8-token greedy chat request, then reads the server's VmRSS (what
`ps -o rss` shows) and the placement /health reports; best and worst of ``--runs`` servers.
To measure another checkout with the same environment: ``PYTHONPATH=DIR`` where DIR holds
that checkout's ``shimmy_core`` and its ``plugins`` folder linked as ``shimmy_plugins``.
"""

from __future__ import annotations

import argparse
import json

import httpx

from common import NO_CACHE, Server, demo_model_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("serve_args", nargs="*")
    args = parser.parse_args()
    model = demo_model_path()
    figures = []
    for _ in range(args.runs):
        server = Server(model, *args.serve_args)
        try:
            r = httpx.post(server.base + "/v1/chat/completions", headers=NO_CACHE, timeout=120, json={
                "model": model.name.removesuffix(".gguf"),
                "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0})
            r.raise_for_status()
            figures.append(server.rss_mb())
            health = httpx.get(server.base + "/health", timeout=10).json()
        finally:
            server.stop()
    print(f"RSS after one request: {min(figures):.0f} to {max(figures):.0f} MB over {len(figures)} servers")
    for model_stats in health.get("models", []):
        print(json.dumps(model_stats.get("placement", "no placement (planner absent)")))


if __name__ == "__main__":
    main()
