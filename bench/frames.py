"""Which fed frame each sent frame was, and how long it took from capture to the websocket.

The worker sends a session's audio as whole 50 ms frames, contiguous and in stream order
(pre-roll first, then everything that followed). So a session's sent frames are one run of
consecutive fed frames: find where that run starts in the device's feed and every frame is
known. The run is located by content: the CRC-32 of every sent frame must equal the CRC-32 of
the fed frame at the same position, for the whole run (a single mismatch rejects a start).
Silence frames all look alike and the speech loop repeats, so several starts can match; the
right one is the latest start for which no frame would have been sent before it was published
(causality). Sessions that match no start are counted as ``unmatched``, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.audio import ZERO_CRC, FeedPlan

STEADY_AFTER_S = 2.0  # a session's first 2 s of sends include the pre-roll backlog
CAUSALITY_SLACK_S = 0.002


@dataclass
class Latencies:
    """Per sent frame: seconds from its capture timestamp ``ts`` to the websocket write."""

    all: list[float] = field(default_factory=list)
    steady: list[float] = field(default_factory=list)
    sessions: int = 0
    unmatched: int = 0
    frames: int = 0
    devices: set[str] = field(default_factory=set)
    by_device_frames: dict[str, set[int]] = field(default_factory=dict)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.all), np.asarray(self.steady)


def _start_of(fed: np.ndarray, sent: np.ndarray, sent_at: np.ndarray, ts0_s: float) -> int | None:
    """Index in ``fed`` of the first frame of ``sent``, or None if no causal run matches."""
    m = len(sent)
    speech = np.flatnonzero(sent != ZERO_CRC)
    anchor = int(speech[0]) if speech.size else 0
    candidates = np.flatnonzero(fed == sent[anchor]) - anchor
    candidates = candidates[(candidates >= 0) & (candidates + m <= len(fed))]
    best = None
    for start in candidates:
        if not np.array_equal(fed[start:start + m], sent):
            continue
        due = ts0_s + (start + 1 + np.arange(m)) * 0.05
        if np.all(due <= sent_at + CAUSALITY_SLACK_S):
            best = int(start) if best is None else max(best, int(start))
    return best


def latencies(plan: FeedPlan, sessions: list[dict[str, Any]]) -> Latencies:
    """Frame latencies of every session the worker recorded (``worker_proc`` output)."""
    devices = {d.name: d for d in plan.devices}
    fed_crcs: dict[str, np.ndarray] = {}
    out = Latencies()
    for session in sessions:
        device = devices.get(session["device"])
        sends = session["sends"]
        if device is None or not sends:
            continue
        out.sessions += 1
        if device.name not in fed_crcs:
            fed_crcs[device.name] = plan.crcs(device)
        sent = np.asarray([c for _, crcs in sends for c in crcs], dtype=np.uint32)
        sent_at = np.asarray([t for t, crcs in sends for _ in crcs])
        ts0_s = device.t0_us / 1e6
        start = _start_of(fed_crcs[device.name], sent, sent_at, ts0_s)
        if start is None:
            out.unmatched += 1
            continue
        index = start + np.arange(len(sent))
        lat = sent_at - (ts0_s + index * 0.05)
        steady = sent_at - sent_at[0] >= STEADY_AFTER_S
        out.all.extend(lat.tolist())
        out.steady.extend(lat[steady].tolist())
        out.frames += len(sent)
        out.devices.add(device.name)
        out.by_device_frames.setdefault(device.name, set()).update(index.tolist())
    return out


def coverage(plan: FeedPlan, lat: Latencies, skip_s: float = 1.0) -> float:
    """Share of the speaking part of every device's feed (from ``skip_s`` after its first
    speech) that went out on some session: 1.0 means nothing the devices said was left unsent."""
    wanted = sent = 0
    skip = round(skip_s / 0.05)
    for device in plan.devices:
        frames = set(range(device.lead + skip, plan.frames))
        wanted += len(frames)
        sent += len(frames & lat.by_device_frames.get(device.name, set()))
    return sent / wanted if wanted else float("nan")
