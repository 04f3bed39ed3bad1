"""``python -m bench.report``: the latest results as one Markdown section.

Reads bench/results/*.json, writes bench/results/LATEST.md and replaces the section between
the ``latest`` markers in bench/README.md with the same text.
"""

from __future__ import annotations

import json
import re
from typing import Any

from bench.common import BENCH_DIR, RESULTS_DIR, machine_line
from bench.devices_per_worker import table as devices_table

BEGIN, END = "<!-- latest:begin -->", "<!-- latest:end -->"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _when(result: dict[str, Any]) -> str:
    load = result.get("load_before") or [float("nan")]
    code = result.get("code", {})
    return (f"run {result['date'][:16].replace('T', ' ')} UTC, {result.get('wall_s', '?')} s, "
            f"load average before {load[0]:.2f}; code {code.get('commit', '?')} "
            f"(sources {code.get('sources_sha256', '?')})")


def section() -> str:
    parts: list[str] = []
    any_result = next((r for r in map(_load, ("bus_latency", "devices_per_worker",
                                              "cost_of_silence", "memory")) if r), None)
    if any_result is not None:
        parts.append(f"Machine: {machine_line(any_result['machine'])}, "
                     f"kernel {any_result['machine']['kernel']}. Other sessions' tests shared "
                     "this machine during some runs: the latency and capacity tables give the "
                     "CPU the rest of the machine used while they measured (`others`).")
    for name, title in (("bus_latency", "Bus latency (capture ts → websocket write)"),
                        ("devices_per_worker", "Devices per worker"),
                        ("thread_cpu", "Where the transcriber's CPU goes"),
                        ("devices_per_worker_whatif", "Devices per worker, what-if (not the "
                                                      "product): reader pauses after each read"),
                        ("thread_cpu_whatif", "Where the CPU goes, what-if (not the product): "
                                              "reader pauses after each read"),
                        ("cost_of_silence", "Cost of silence"),
                        ("memory", "Memory")):
        result = _load(name)
        if result is None:
            continue
        table = result["table"]
        if name.startswith("devices_per_worker"):
            table = devices_table(result["levels"])  # sorted by devices, whatever the run order
        parts.append(f"### {title}\n\n{_when(result)}\n\n{table}")
        extra = _notes(name, result)
        if extra:
            parts.append(extra)
    return "\n\n".join(parts) + "\n"


def _notes(name: str, result: dict[str, Any]) -> str:
    if name.startswith("thread_cpu"):
        return "; ".join(f"{lv['devices']} devices: transcriber {lv['transcriber_cores']:.2f} "
                         f"cores while the machine was busy {lv['machine_busy_cores']:.2f}"
                         for lv in result["levels"] if "machine_busy_cores" in lv) + "."
    if name.startswith("devices_per_worker"):
        return f"Largest passing level: **{result['largest_passing']}** ({result['criteria']})."
    if name == "cost_of_silence":
        return (f"Recording {result['recording_s']:.0f} s, speech {result['speech_s']:.1f} s "
                f"({result['speech_s'] / result['recording_s']:.0%}), "
                f"{len(result['spoken_digits'])} digits. Target (≤ 1.15 × ideal, 100 % recall): "
                f"**{'met' if result['target_met'] else 'missed'}**.")
    return ""


def main() -> int:
    text = section()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "LATEST.md").write_text("## Benchmarks (latest run)\n\n" + text)
    readme = BENCH_DIR / "README.md"
    if readme.exists():
        body = readme.read_text()
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        if pattern.search(body):
            readme.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}{END}", body))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
