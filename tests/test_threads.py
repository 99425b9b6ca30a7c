"""llama.cpp's thread counts: the default rule (one thread per physical core for one-token
steps, every usable core for larger batches), ``--threads`` and ``--threads-batch``, checked
on sysfs trees laid out like real machines and on a real server's llama.cpp context."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from shimmy_plugins.backends.gguf.gguf_backend import engine_threads, physical_cores, usable_cpus
from shimmy_plugins.backends.gguf.gguf_engine import ThreadChooser
from tests.conftest import MODEL_ID


def sysfs(root: Path, layout: dict[int, tuple[int, int]]) -> str:
    """A /sys/devices/system/cpu with ``{cpu: (package, core)}``."""
    for cpu, (package, core) in layout.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    return str(root)


def test_smt_siblings_count_once_and_a_vm_without_smt_counts_every_cpu(tmp_path):
    # 8 logical CPUs on 4 cores (siblings n and n+4), as Linux numbers a desktop's SMT.
    smt = sysfs(tmp_path / "smt", {cpu: (0, cpu % 4) for cpu in range(8)})
    assert physical_cores(list(range(8)), smt) == 4
    assert physical_cores([0, 4], smt) == 1          # taskset onto one core's two siblings
    assert engine_threads(cpus=list(range(8)), sysfs=smt) == (4, 8)
    # A 2-vCPU VM shows no SMT: both are cores, and one stream generates on both.
    vm = sysfs(tmp_path / "vm", {0: (0, 0), 1: (0, 1)})
    assert engine_threads(cpus=[0, 1], sysfs=vm) == (2, 2)
    # Two sockets with the same core ids are different cores.
    two = sysfs(tmp_path / "two", {0: (0, 0), 1: (1, 0)})
    assert physical_cores([0, 1], two) == 2


def test_without_sysfs_the_guess_is_llama_cpps(tmp_path):
    missing = str(tmp_path / "none")
    assert physical_cores([0, 1, 2, 3], missing) == 4
    assert physical_cores(list(range(16)), missing) == 8


def test_flags_win_and_threads_batch_follows_threads_unless_given(tmp_path):
    vm = sysfs(tmp_path, {0: (0, 0), 1: (0, 1)})
    assert engine_threads(1, cpus=[0, 1], sysfs=vm) == (1, 1)
    assert engine_threads(1, 2, cpus=[0, 1], sysfs=vm) == (1, 2)
    assert engine_threads(0, 1, cpus=[0, 1], sysfs=vm) == (2, 1)
    assert usable_cpus() and all(isinstance(c, int) for c in usable_cpus())


@pytest.mark.parametrize("flags", [[], ["--threads", "1", "--threads-batch", "2"]])
def test_a_server_gives_llama_cpp_the_thread_counts(start_server, smollm2_path, flags):
    server = start_server(["--model", str(smollm2_path), "--no-demo", *flags])
    answer = httpx.post(server.url + "/chat/completions", timeout=60, json={
        "model": MODEL_ID, "max_tokens": 40, "temperature": 0, "messages": [{"role": "user", "content": "Count to 20."}]})
    answer.raise_for_status()
    [model] = [m for m in httpx.get(server.base + "/health", timeout=10).json()["models"] if m["id"] == MODEL_ID]
    if flags:   # as asked, and no choosing
        assert (model["threads"], model["threads_batch"]) == (1, 2) and "one_token_step_ms" not in model
        return
    threads, batch = engine_threads()
    assert model["threads_batch"] == batch
    choices = {threads, max(1, threads // 2)}
    assert model["threads"] in choices
    if len(choices) > 1:  # the one-token steps of the answer were timed with each choice
        assert set(model["one_token_step_ms"]) == {str(n) for n in choices}
        if answer.json()["usage"]["completion_tokens"] > 2 * ThreadChooser.WARMUP + 2:
            assert all(ms > 0 for ms in model["one_token_step_ms"].values()), model


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_steps(chooser: ThreadChooser, clock: Clock, steps: int, cost: dict[int, float]) -> list[int]:
    picked = []
    for _ in range(steps):
        n = chooser.pick()
        picked.append(n)
        clock.now += cost[n]
    return picked


def test_the_chooser_tries_each_count_then_keeps_the_fastest_and_looks_again_now_and_then():
    clock = Clock()
    chooser = ThreadChooser([1, 2], clock)
    warm = ThreadChooser.WARMUP
    picked = run_steps(chooser, clock, 2 * warm + 1, {2: 0.010, 1: 0.020})
    assert picked == [2] * warm + [1] * warm + [2]   # then the faster
    later = run_steps(chooser, clock, 2000, {2: 0.010, 1: 0.020})
    looks = [i for i, n in enumerate(later) if n == 1]
    gaps = [b - a for a, b in zip(looks, looks[1:])]
    # each look finds 1 thread clearly slower: the steps between looks double, up to a limit
    assert gaps[:4] == [2 * ThreadChooser.EXPLORE_EVERY, 4 * ThreadChooser.EXPLORE_EVERY,
                        ThreadChooser.EXPLORE_MAX, ThreadChooser.EXPLORE_MAX]
    assert set(gaps[3:]) == {ThreadChooser.EXPLORE_MAX}
    # Another process takes a core: two threads now wait at every barrier.  Every step counts
    # against 2, so 1 takes over within a few steps, with no look needed.
    slower = run_steps(chooser, clock, 8 * ThreadChooser.EXPLORE_EVERY, {2: 0.200, 1: 0.025})
    assert slower[:12].count(1) >= 4
    looks = [i for i, n in enumerate(slower) if n == 2 and i >= 12]   # then only the looks,
    every = ThreadChooser.EXPLORE_EVERY                                   # starting over
    assert [b - a for a, b in zip(looks, looks[1:])] == [every, 2 * every, 4 * every]
    assert chooser.best() == 1
    # The process ends: the next look at 2 threads finds it faster, and it is used at once.
    again = run_steps(chooser, clock, ThreadChooser.EXPLORE_MAX + 2, {2: 0.010, 1: 0.025})
    first = again.index(2)
    assert again[first:] == [2] * len(again[first:])
    assert chooser.best() == 2


def test_looks_stay_frequent_while_the_counts_are_close():
    clock = Clock()
    chooser = ThreadChooser([1, 2], clock)
    picked = run_steps(chooser, clock, 2 * ThreadChooser.WARMUP + 8 * ThreadChooser.EXPLORE_EVERY,
                       {2: 0.010, 1: 0.0105})
    assert picked[2 * ThreadChooser.WARMUP:].count(1) >= 7   # one look per EXPLORE_EVERY steps


def test_an_interval_broken_by_other_work_is_not_counted():
    clock = Clock()
    chooser = ThreadChooser([2, 1], clock)
    chooser.pick()
    clock.now += 5.0         # an idle wait, a prompt chunk
    chooser.interrupt()
    chooser.pick()
    assert chooser.samples[2] == 0 and chooser.mean[2] is None
    clock.now += 0.01
    chooser.pick()
    assert chooser.samples[2] == 1 and chooser.mean[2] == pytest.approx(0.01)


def test_threads_batch_is_a_setting_like_threads(monkeypatch):
    from shimmy_core.cli import _parser
    from shimmy_core.contract.settings import MODEL_OPTIONS, Settings

    for command in ("serve", "probe", "run"):
        argv = [command] + ([] if command == "serve" else ["m"]) + ["--threads", "3", "--threads-batch", "5"]
        args = vars(_parser().parse_args(argv))
        assert (args["threads"], args["threads_batch"]) == (3, 5)
    assert Settings.load({}, {"SHIMMY_THREADS_BATCH": "6"}).threads_batch == 6
    assert "threads_batch" in MODEL_OPTIONS
