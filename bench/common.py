"""Shared helpers of the benchmarks: statistics, tables, machine facts, /proc sampling, results."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def stats_ms(seconds: Iterable[float] | np.ndarray) -> dict[str, float | int]:
    """n, p50, p99, max and mean of durations given in seconds, in milliseconds."""
    values = np.asarray(list(seconds) if not isinstance(seconds, np.ndarray) else seconds,
                        dtype=np.float64) * 1000.0
    if values.size == 0:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan"),
                "mean": float("nan")}
    return {"n": int(values.size), "p50": round(float(np.percentile(values, 50)), 2),
            "p99": round(float(np.percentile(values, 99)), 2),
            "max": round(float(values.max()), 2), "mean": round(float(values.mean()), 2)}


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                   check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    redis_version = "?"
    binary = shutil.which("redis-server")
    if binary:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             check=False).stdout
        for part in out.split():
            if part.startswith("v="):
                redis_version = part[2:]
    return {"cpu_model": model, "cores": os.cpu_count(), "ram_gib": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "redis": redis_version,
            "kernel": platform.release()}


def machine_line(info: dict[str, Any]) -> str:
    return (f"{info['cores']} cores ({info['cpu_model']}, KVM), {info['ram_gib']} GiB RAM, "
            f"Python {info['python']}, Redis {info['redis']}")


def code_version() -> dict[str, str]:
    """The commit, and a digest of the product's sources as they were (the tree may be dirty)."""
    digest = hashlib.sha256()
    for path in sorted([*REPO.glob("capture/**/*.py"), *REPO.glob("transcriber/**/*.py")]):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=False).stdout.strip()
    return {"commit": head or "?", "sources_sha256": digest.hexdigest()[:12]}


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"bench": name, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
               "machine": machine(), "code": code_version(), **data}
    path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(value: object) -> object:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")


# --- /proc sampling (one process) ---------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads) so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), or the thread count (Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class CpuMeter:
    """CPU time / wall time of a process between two calls."""

    def __init__(self, pid: int, wall: float) -> None:
        self.pid = pid
        self._cpu0 = cpu_seconds(pid)
        self._wall0 = wall

    def share(self, wall: float) -> float:
        """Cores used on average since construction (1.0 = one core busy)."""
        return (cpu_seconds(self.pid) - self._cpu0) / max(wall - self._wall0, 1e-9)


def system_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat, everything but idle/iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


class SystemMeter:
    """Cores busy machine-wide between construction and ``share`` (to tell the benchmark's
    own processes from whatever else runs on the machine at the same time)."""

    def __init__(self, wall: float) -> None:
        self._busy0 = system_busy_seconds()
        self._wall0 = wall

    def share(self, wall: float) -> float:
        return (system_busy_seconds() - self._busy0) / max(wall - self._wall0, 1e-9)


def cpu_window(pids: dict[str, int | None], start: float, end: float) -> dict[str, float]:
    """Cores used by each named process between the epoch times ``start`` and ``end`` (sleeps
    until then), plus ``others``: the rest of the machine's busy time in that window."""
    time.sleep(max(0.0, start - time.time()))
    now = time.time()
    meters = {name: CpuMeter(pid, now) for name, pid in pids.items() if pid is not None}
    machine_meter = SystemMeter(now)
    time.sleep(max(0.0, end - time.time()))
    now = time.time()
    shares = {name: round(m.share(now), 3) for name, m in meters.items()}
    shares["others"] = round(max(0.0, machine_meter.share(now) - sum(shares.values())), 3)
    return shares


def redis_pid(port: int) -> int | None:
    """The redis-server listening on ``port`` (it renames itself "redis-server HOST:PORT")."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"redis-server" in argv[0] and argv[0].endswith(b":%d" % port):
            return int(proc.name)
    return None
