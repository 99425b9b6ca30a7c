"""How soon `shimmy serve` answers, next to a bare Falcon + waitress app in the same run.

    .venv/bin/python bench/ready_bench.py [--runs 7] [--before OTHER_VENV/bin/python]

Byte code is cached (as pip leaves it; PYTHONDONTWRITEBYTECODE is dropped) and a first start of
each is left out.  Each run starts both servers (alternating, one at a time) and times from the spawn to the first
200 on /health.  Shimmy serves the demo model (`--model SmolLM2 --no-demo`); its first /v1/models
answer is checked to list the model, so that nothing is put off past the first answer.  Prints a
Markdown table of the median, the fastest and the slowest of each, and the ratio of the medians.
`--before` adds a third series: `shimmy serve` from another environment (an older checkout's
virtual environment), to compare before and after a change in one run.  `--importtime` also prints the slowest imports of `shimmy serve` (python -X importtime).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import sys

import httpx

from common import Server, demo_model_path

BARE_APP = """
import sys, falcon, waitress
class Health:
    def on_get(self, req, resp):
        resp.media = {"status": "ok"}
app = falcon.App()
app.add_route("/health", Health())
waitress.serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=4, _quiet=True)
"""


def bare(port: int) -> list[str]:
    return [sys.executable, "-c", BARE_APP, str(port)]


def shimmy_with(python: str, model):
    def command(port: int) -> list[str]:
        return [python, "-m", "shimmy_core", "serve", "--host", "127.0.0.1", "--port", str(port),
                "--model", str(model), "--no-demo", "--no-cache"]
    return command


def slowest_imports(model, top: int = 15) -> list[tuple[int, str]]:
    """The ``top`` slowest imports (cumulative microseconds) of `shimmy serve` up to its first answer."""
    with tempfile.TemporaryDirectory() as home:
        probe = _importtime(model, home)
    rows = []
    for line in probe.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    return sorted(rows, reverse=True)[:top]


def _importtime(model, home: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-c",
         "import sys; from shimmy_core.cli import _parser, _settings; from shimmy_core.app import build; "
         f"build(_settings(_parser().parse_args(['serve', '--model', {str(model)!r}, '--no-demo'])))"],
        capture_output=True, text=True, env={**os.environ, "SHIMMY_HOME": home}, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--importtime", action="store_true")
    parser.add_argument("--before", metavar="PYTHON", help="also time `shimmy serve` run by this interpreter")
    args = parser.parse_args()
    model = demo_model_path()
    # Measure what users see: byte code cached (as pip leaves it), and the first start of each
    # (which writes the cache and warms the page cache) left out.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    series = {"bare Falcon + waitress": bare}
    if args.before:
        series["shimmy serve --model SmolLM2 (before)"] = shimmy_with(args.before, model)
    series["shimmy serve --model SmolLM2"] = None  # this checkout
    for command in series.values():
        Server(model, command=command).stop()
    times: dict[str, list[float]] = {name: [] for name in series}
    for _ in range(args.runs):
        for name, command in series.items():
            server = Server(model, command=command)
            listed = httpx.get(server.base + "/v1/models", timeout=30).json().get("data")
            times[name].append(server.ready_s)
            server.stop()
            assert command is bare or [m["id"] for m in listed] == [model.stem], listed
    print(f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}; "
          f"{args.runs} runs each, alternating")
    print()
    print("| server | median | fastest | slowest |")
    print("|---|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.3f} s | {min(values):.3f} s | {max(values):.3f} s |")
    bare_median = statistics.median(times["bare Falcon + waitress"])
    print()
    for name, values in list(times.items())[1:]:
        print(f"{name} / bare app (medians): {statistics.median(values) / bare_median:.2f}x")
    if args.importtime:
        print("\nSlowest imports (cumulative):")
        for micros, name in slowest_imports(model):
            print(f"  {micros / 1000:7.1f} ms  {name}")


if __name__ == "__main__":
    main()
