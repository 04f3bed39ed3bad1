"""Where the transcriber's CPU goes, per kind of thread: what limits devices per worker.

    .venv/bin/python -m bench.thread_cpu [--devices 50 200] [--seconds 10]

Runs the same stack as ``bench.devices_per_worker`` at one level and, once every device
speaks, reads utime/stime and context switches of every thread from /proc/<pid>/task over the
window. Thread names come from the transcriber itself (``bench.worker_proc`` writes OS thread
id → name on SIGUSR1); device-specific names are folded (``device-*``, ``aai-*``, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    CLOCK_TICKS,
    SystemMeter,
    loadavg,
    machine,
    machine_line,
    md_table,
    write_result,
)
from bench.stack import Stack

LEAD_S = (0.5, 3.0)


def _task(pid: int, tid: str) -> tuple[int, int, int, int] | None:
    """utime, stime (ticks), voluntary and involuntary context switches of one thread."""
    try:
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    switches = dict(re.findall(r"^(\w*voluntary_ctxt_switches):\s+(\d+)", status, re.M))
    return (int(fields[11]), int(fields[12]), int(switches["voluntary_ctxt_switches"]),
            int(switches["nonvoluntary_ctxt_switches"]))


def snapshot(pid: int) -> dict[str, tuple[int, int, int, int]]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        sample = _task(pid, task.name)
        if sample is not None:
            out[task.name] = sample
    return out


def by_kind(before: dict[str, tuple[int, int, int, int]],
            after: dict[str, tuple[int, int, int, int]], names: dict[str, str],
            seconds: float) -> list[dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    for tid, (u1, s1, v1, n1) in after.items():
        if tid not in before:
            continue
        u0, s0, v0, n0 = before[tid]
        kind = re.sub(r"-[A-Za-z0-9_.]+-\d{4}$", "-*", names.get(tid, "?"))
        k = kinds.setdefault(kind, {"threads": 0, "user": 0.0, "sys": 0.0, "vcs": 0.0,
                                    "nvcs": 0.0})
        k["threads"] += 1
        k["user"] += (u1 - u0) / CLOCK_TICKS / seconds
        k["sys"] += (s1 - s0) / CLOCK_TICKS / seconds
        k["vcs"] += (v1 - v0) / seconds
        k["nvcs"] += (n1 - n0) / seconds
    rows = [{"kind": kind, **{k: round(v, 3) if isinstance(v, float) else v
                              for k, v in vals.items()}} for kind, vals in kinds.items()]
    return sorted(rows, key=lambda r: -(r["user"] + r["sys"]))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.thread_cpu")
    p.add_argument("--devices", type=int, nargs="+", default=[50, 200])
    p.add_argument("--seconds", type=float, default=10.0, help="measurement window")
    p.add_argument("--whatif-read-pause", type=float, metavar="S",
                   help="not the product: pause S seconds after each stream read")
    return p.parse_args(argv)


def measure(devices: int, seconds: float, read_pause_s: float | None) -> dict[str, Any]:
    with Stack() as stack:
        stack.start_redis()
        double = stack.double("cheap")
        env = {"BENCH_RECORD": "0"}
        if read_pause_s is not None:
            env["BENCH_WHATIF_READ_PAUSE_S"] = str(read_pause_s)
        worker = stack.worker(double.url, env)
        feeder = stack.feeder(devices=devices, seconds=seconds + LEAD_S[1] + 8, start=0.0,
                              lead=LEAD_S)
        time.sleep(max(0.0, feeder.plan.start + LEAD_S[1] + 4 - time.time()))
        os.kill(worker.pid, signal.SIGUSR1)
        time.sleep(0.5)
        names_file = next(stack.dir.glob("*worker.threads.json"))
        names = {str(k): v for k, v in json.loads(names_file.read_text()).items()}
        before, began = snapshot(worker.pid), time.time()
        busy = SystemMeter(began)
        time.sleep(seconds)
        after, window = snapshot(worker.pid), time.time() - began
        machine_busy = busy.share(time.time())
        feeder.wait()
        worker.stop()
        double.stop()
    rows = by_kind(before, after, names, window)
    own = sum(r["user"] + r["sys"] for r in rows)
    return {"devices": devices, "window_s": round(window, 1), "rows": rows,
            "transcriber_cores": round(own, 3), "machine_busy_cores": round(machine_busy, 3)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began, load_before = time.time(), loadavg()
    levels = [measure(n, args.seconds, args.whatif_read_pause) for n in args.devices]
    lines = []
    for level in levels:
        total = sum(r["user"] + r["sys"] for r in level["rows"])
        for r in level["rows"]:
            if r["user"] + r["sys"] >= 0.005:
                lines.append([level["devices"], r["kind"], r["threads"], f"{r['user']:.3f}",
                              f"{r['sys']:.3f}", f"{(r['user'] + r['sys']) / total:.0%}",
                              f"{r['vcs']:.0f}", f"{r['nvcs']:.0f}"])
    text = md_table(["devices", "threads", "count", "user (cores)", "sys (cores)", "share",
                     "voluntary switches/s", "involuntary/s"], lines)
    print(f"\nTranscriber CPU by thread ({machine_line(machine())})\n")
    print(text)
    for level in levels:
        print(f"{level['devices']} devices: transcriber {level['transcriber_cores']:.2f} cores, "
              f"machine busy {level['machine_busy_cores']:.2f} cores")
    name = "thread_cpu" + ("_whatif" if args.whatif_read_pause is not None else "")
    path = write_result(name, {"levels": levels, "whatif_read_pause_s": args.whatif_read_pause,
                               "load_before": load_before, "load_after": loadavg(),
                               "wall_s": round(time.time() - began, 1), "table": text})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
