"""The devices a model can be placed on, and how much memory each has free right now.

The CPU's memory comes from ``/proc/meminfo`` (``MemAvailable``), capped by the cgroup's
limit when Shimmy runs in a container.  GPUs come from ``nvidia-smi`` when it is on the
``PATH``, else from torch when torch is already imported with CUDA; neither is required, and
a machine without them simply has no GPU.  ``--max-memory`` caps what the planner may use
of each device (``8G`` for the CPU, or ``cpu=8G,cuda:0=20G``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from shimmy_core.contract.memory import Device

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}


def parse_size(text: str) -> int:
    """``512M``, ``8G``, ``1.5GiB``, ``1000000`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a size (use e.g. 512M, 8G)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def parse_max_memory(text: str) -> dict[str, int]:
    """``8G`` (the CPU) or ``cpu=8G,cuda:0=20G`` -> {device: bytes}."""
    caps: dict[str, int] = {}
    for item in (p.strip() for p in (text or "").split(",")):
        if not item:
            continue
        name, _, size = item.rpartition("=")
        caps[name.strip() or "cpu"] = parse_size(size)
    return caps


def _meminfo() -> tuple[int, int]:
    total = available = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "MemTotal":
                total = int(value.split()[0]) * 1024
            elif key == "MemAvailable":
                available = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if not total:  # not Linux: what os.sysconf knows, else a guess that plans nothing away
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            available = available or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = available = 1 << 40
    return total, available or total


def _cgroup_room() -> int | None:
    """What the cgroup (v2) still lets this process allocate, when it has a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        current = int(Path("/sys/fs/cgroup/memory.current").read_text())
        return max(0, int(limit) - current)
    except (OSError, ValueError):
        return None


def cpu_device() -> Device:
    total, available = _meminfo()
    room = _cgroup_room()
    if room is not None:
        available = min(available, room)
    return Device("cpu", total, available, f"host memory, {os.cpu_count() or 1} logical cores")


def nvidia_gpus(timeout: float = 5.0) -> list[Device]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=index,name,memory.total,memory.free",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=timeout, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            gpus.append(Device(f"cuda:{parts[0]}", int(float(parts[2])) << 20, int(float(parts[3])) << 20, parts[1]))
    return gpus


def torch_gpus() -> list[Device]:
    """CUDA devices through torch, only when something already imported it (torch takes seconds
    to import, and a GGUF-only server never needs it)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    try:
        if not torch.cuda.is_available():
            return []
        gpus = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append(Device(f"cuda:{i}", int(total), int(free), torch.cuda.get_device_name(i)))
        return gpus
    except Exception:  # a broken driver is no GPU, not a crash
        return []


def detect(max_memory: str = "") -> list[Device]:
    """The CPU, then every GPU, each with its free memory capped by ``--max-memory``."""
    devices = [cpu_device(), *(nvidia_gpus() or torch_gpus())]
    caps = parse_max_memory(max_memory)
    return [Device(d.name, d.total, min(d.free, caps[d.name]), d.label) if d.name in caps else d for d in devices]
