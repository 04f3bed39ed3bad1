"""Bus latency: from a frame's capture timestamp to its bytes on the AssemblyAI websocket.

    .venv/bin/python -m bench.bus_latency [--devices 1 50 200] [--seconds 30]

For each number of concurrently speaking devices: a real redis-server, the double (own
process, pacing check on, cheap recogniser), the transcriber (own process, real ``Worker``,
``open_session`` wrapped to timestamp each websocket write, see ``bench.worker_proc``) and the
feeder (own process, frames published when complete, at ts + 50 ms). Each sent frame is
identified by content (``bench.frames``). Steady state = frames sent ≥ 2 s after the session's
first send (the pre-roll backlog, sent at once after Begin, is behind us); the whole-session
distribution includes the backlog.

The same run measures the floor (Redis XADD → XREAD BLOCK, nothing else) and a direct
in-process hand-off (``queue.Queue`` between threads), both from the moment a frame is
complete, and reports edgescribe's steady-state latency from that same moment as a ratio.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.common import (
    cpu_window,
    loadavg,
    machine,
    machine_line,
    md_table,
    redis_pid,
    stats_ms,
    write_result,
)
from bench.floors import queue_floor, redis_floor
from bench.frames import coverage, latencies
from bench.stack import Stack

FRAME_S = 0.05
SETTLE_S = 4.0  # after the feed: sessions end on end-of-stream
LEAD_S = (0.5, 3.0)  # silence before each device speaks


def count_3007(double: list[dict[str, Any]]) -> int:
    return sum(1 for r in double if r["close_code"] == 3007 or 3007 in r["errors"])


def run_level(stack: Stack, devices: int, seconds: float) -> dict[str, Any]:
    assert stack.redis is not None
    stack.redis.client().flushall()
    floor = redis_floor(stack, devices, min(seconds, 10.0))
    direct = queue_floor(devices, min(seconds, 10.0))
    stack.redis.client().flushall()
    double = stack.double("cheap")
    worker = stack.worker(double.url)
    feeder = stack.feeder(devices=devices, seconds=seconds, start=0.0, lead=LEAD_S)
    pids = {"transcriber": worker.pid, "double": double.child.pid, "feeder": feeder.pid,
            "redis": redis_pid(stack.redis.port)}
    cpu = cpu_window(pids, feeder.plan.start + LEAD_S[1] + 2.0,
                     feeder.plan.start + seconds - 0.5)
    fed = feeder.wait()
    time.sleep(SETTLE_S)
    result = worker.stop()
    sessions = double.stop()
    lat = latencies(feeder.plan, result["sessions"])
    everything, steady = lat.arrays()
    after_publish = steady - FRAME_S
    out: dict[str, Any] = {
        "devices": devices, "seconds": seconds,
        "ts_to_ws_steady_ms": stats_ms(steady),
        "ts_to_ws_all_ms": stats_ms(everything),
        "publish_to_ws_steady_ms": stats_ms(after_publish),
        "redis_floor_ms": stats_ms(floor),
        "queue_handoff_ms": stats_ms(direct),
        "sessions": lat.sessions, "unmatched_sessions": lat.unmatched,
        "devices_with_session": len(lat.devices),
        "coverage": round(coverage(feeder.plan, lat), 4),
        "double_3007": count_3007(sessions), "cpu_cores": cpu,
        "feeder": fed,
        "worker_errors": {k: v for k, v in result["metrics"].items()
                          if k.startswith("transcriber_errors_total")},
    }
    for ref in ("redis_floor_ms", "queue_handoff_ms"):
        for p in ("p50", "p99"):
            base = out[ref][p]
            out[f"ratio_{p}_vs_{ref.removesuffix('_ms')}"] = (
                round(out["publish_to_ws_steady_ms"][p] / base, 1) if base > 0 else None)
    return out


def table(levels: list[dict[str, Any]]) -> str:
    def trio(s: dict[str, Any]) -> str:
        return f"{s['p50']:.1f} / {s['p99']:.1f} / {s['max']:.1f}"

    rows = []
    for lv in levels:
        rows.append([
            lv["devices"], trio(lv["ts_to_ws_steady_ms"]), trio(lv["ts_to_ws_all_ms"]),
            trio(lv["publish_to_ws_steady_ms"]), trio(lv["redis_floor_ms"]),
            trio(lv["queue_handoff_ms"]),
            f"{lv['ratio_p50_vs_redis_floor']} / {lv['ratio_p99_vs_redis_floor']}",
            f"{lv['ratio_p50_vs_queue_handoff']} / {lv['ratio_p99_vs_queue_handoff']}",
            lv["double_3007"], f"{lv['coverage']:.3f}",
            f"{lv['cpu_cores']['transcriber']:.2f} / {lv['cpu_cores']['others']:.2f}",
        ])
    return md_table(
        ["devices", "ts→ws steady p50/p99/max ms", "ts→ws whole session",
         "published→ws steady", "floor: XADD→XREAD", "queue.Queue hand-off",
         "× floor p50/p99", "× queue p50/p99", "3007", "frames sent",
         "CPU transcriber / others"], rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bus_latency")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 50, 200])
    p.add_argument("--seconds", type=float, default=30.0, help="audio fed per level")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.time()
    load_before = loadavg()
    levels = []
    with Stack() as stack:
        stack.start_redis()
        for devices in args.devices:
            levels.append(run_level(stack, devices, args.seconds))
            print(f"  {devices} devices done", flush=True)
    text = table(levels)
    print(f"\nBus latency ({machine_line(machine())}; load before "
          f"{load_before[0]:.2f}, after {loadavg()[0]:.2f})\n")
    print(text)
    path = write_result("bus_latency", {
        "levels": levels, "load_before": load_before, "load_after": loadavg(),
        "wall_s": round(time.time() - began, 1), "table": text,
        "method": "ts of each frame vs time.time() right after StreamingSession.send_audio "
                  "returned; frames identified by CRC-32 of content; steady = sent >= 2 s "
                  "after the session's first send; floors from ts + 50 ms",
    })
    print(f"\nwrote {path}")
    return 0 if all(np.isfinite(lv["ts_to_ws_steady_ms"]["p50"]) for lv in levels) else 1


if __name__ == "__main__":
    raise SystemExit(main())
