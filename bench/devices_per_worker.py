"""Devices per worker: how many concurrently speaking devices one transcriber process carries.

    .venv/bin/python -m bench.devices_per_worker [--devices 50 200 500] [--seconds 35]

Per level: a fresh double (own process, pacing check on, cheap recogniser), a fresh transcriber
(own process, ``bench.worker_proc``), and the feeder (own process) with every device speaking
after a 0.5–5 s lead. Once every device has started and its backlog is out, the transcriber's
CPU (utime + stime from /proc/<pid>/stat over wall time) is measured until the feed ends; RSS
(VmRSS) at the end of the window. The other processes' CPU is measured the same way, for
context: they share the same 2 cores.

A level passes when the frame lag (capture ts → websocket write, steady state) has p99 under
250 ms, the double closed no session with 3007, and ≥ 99 % of what the devices said was sent.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from bench.bus_latency import count_3007
from bench.common import (
    cpu_window,
    loadavg,
    machine,
    machine_line,
    md_table,
    redis_pid,
    stats_ms,
    status_kb,
    write_result,
)
from bench.frames import coverage, latencies
from bench.stack import Stack

LAG_P99_LIMIT_MS = 250.0
LEAD_S = (0.5, 5.0)
WARMUP_AFTER_LEAD_S = 4.0
SETTLE_S = 4.0
BUDGET_S = 280.0  # the whole benchmark stays under 5 minutes


def run_level(stack: Stack, devices: int, seconds: float,
              read_pause_s: float | None) -> dict[str, Any]:
    assert stack.redis is not None
    stack.redis.client().flushall()
    double = stack.double("cheap")
    env = {"TRANSCRIBER_MAX_DEVICES": str(max(1000, devices))}
    if read_pause_s is not None:
        env["BENCH_WHATIF_READ_PAUSE_S"] = str(read_pause_s)
    worker = stack.worker(double.url, env)
    feeder = stack.feeder(devices=devices, seconds=seconds, start=0.0, lead=LEAD_S)
    plan = feeder.plan
    window_start = plan.start + LEAD_S[1] + WARMUP_AFTER_LEAD_S
    window_end = plan.start + seconds - 0.5
    pids = {"transcriber": worker.pid, "double": double.child.pid, "feeder": feeder.pid,
            "redis": redis_pid(stack.redis.port)}
    cpu = cpu_window(pids, window_start, window_end)
    rss_mb = round(status_kb(worker.pid, "VmRSS") / 1024, 1)
    hwm_mb = round(status_kb(worker.pid, "VmHWM") / 1024, 1)
    threads = status_kb(worker.pid, "Threads")
    double_rss_mb = round(status_kb(double.child.pid, "VmRSS") / 1024, 1)
    fed = feeder.wait()
    time.sleep(SETTLE_S)
    result = worker.stop()
    sessions = double.stop()
    lat = latencies(plan, result["sessions"])
    _, steady = lat.arrays()
    lag = stats_ms(steady)
    errors = {k: v for k, v in result["metrics"].items()
              if k.startswith("transcriber_errors_total") and v}
    out = {
        "devices": devices, "seconds": seconds, "window_s": round(window_end - window_start, 1),
        "lag_steady_ms": lag, "cpu_cores": cpu, "transcriber_rss_mb": rss_mb,
        "transcriber_hwm_mb": hwm_mb, "transcriber_threads": threads,
        "double_rss_mb": double_rss_mb, "sessions": lat.sessions,
        "unmatched_sessions": lat.unmatched, "devices_with_session": len(lat.devices),
        "coverage": round(coverage(plan, lat), 4), "double_3007": count_3007(sessions),
        "worker_errors": errors, "feeder": fed, "stop_s": result["stop_s"],
    }
    out["passed"] = bool(lag["p99"] < LAG_P99_LIMIT_MS and out["double_3007"] == 0
                         and out["coverage"] >= 0.99 and len(lat.devices) == devices)
    return out


def next_level(levels: list[dict[str, Any]]) -> int | None:
    """One more level to narrow the answer: between the largest pass and the smallest
    failure, or beyond the largest pass; None when it is narrow enough."""
    passed = [lv["devices"] for lv in levels if lv["passed"]]
    failed = [lv["devices"] for lv in levels if not lv["passed"]]
    low = max(passed, default=0)
    high = min((f for f in failed if f > low), default=None)
    if high is None:
        return round(low * 1.6 / 25) * 25 if low else None
    if high - low <= max(25, low // 4):
        return None
    return max(low + 25, round((low + high) / 2 / 25) * 25)


def table(levels: list[dict[str, Any]]) -> str:
    rows = []
    for lv in sorted(levels, key=lambda lv: lv["devices"]):
        lag, cpu = lv["lag_steady_ms"], lv["cpu_cores"]
        rows.append([
            lv["devices"], f"{lag['p50']:.1f} / {lag['p99']:.1f} / {lag['max']:.1f}",
            lv["double_3007"], f"{lv['coverage']:.3f}", f"{cpu['transcriber']:.2f}",
            f"{lv['transcriber_rss_mb']:.0f}", lv["transcriber_threads"],
            f"{cpu.get('double', 0):.2f} / {cpu.get('redis', 0):.2f} / "
            f"{cpu.get('feeder', 0):.2f} / {cpu['others']:.2f}",
            f"{lv['feeder']['lateness_ms']['p99']:.0f}", lv["sessions"],
            "yes" if lv["passed"] else "no",
        ])
    return md_table(["devices", "lag p50/p99/max ms", "3007", "frames sent",
                     "transcriber CPU (cores)", "transcriber RSS MB", "threads",
                     "double / redis / feeder / other CPU", "feeder late p99 ms", "sessions",
                     "pass"], rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.devices_per_worker")
    p.add_argument("--devices", type=int, nargs="+", default=[50, 200, 500])
    p.add_argument("--seconds", type=float, default=35.0, help="audio fed per level")
    p.add_argument("--whatif-read-pause", type=float, metavar="S",
                   help="not the product: pause S seconds after each stream read (see "
                        "bench.worker_proc); writes devices_per_worker_whatif.json")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.time()
    load_before = loadavg()
    levels: list[dict[str, Any]] = []
    with Stack() as stack:
        stack.start_redis()
        todo = list(args.devices)
        while todo:
            devices = todo.pop(0)
            levels.append(run_level(stack, devices, args.seconds, args.whatif_read_pause))
            print(f"  {devices} devices: {'pass' if levels[-1]['passed'] else 'FAIL'}",
                  flush=True)
            extra = next_level(levels)
            per_level = (time.time() - began) / len(levels)
            if (not todo and extra is not None and extra not in args.devices
                    and time.time() - began + per_level < BUDGET_S):
                todo.append(extra)
                args.devices.append(extra)
    passing = [lv["devices"] for lv in levels if lv["passed"]]
    text = table(levels)
    best = max(passing) if passing else None
    print(f"\nDevices per worker ({machine_line(machine())}; load before {load_before[0]:.2f})\n")
    print(text)
    print(f"\nlargest passing level: {best}")
    name = "devices_per_worker" + ("_whatif" if args.whatif_read_pause is not None else "")
    path = write_result(name, {
        "whatif_read_pause_s": args.whatif_read_pause,
        "levels": levels, "largest_passing": best, "load_before": load_before,
        "load_after": loadavg(), "wall_s": round(time.time() - began, 1), "table": text,
        "criteria": f"steady-state frame lag p99 < {LAG_P99_LIMIT_MS:.0f} ms (ts -> websocket "
                    "write), no 3007 from the double, >= 99 % of speech frames sent",
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
