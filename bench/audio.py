"""The audio the benchmarks speak, and the feed plan that says which frame went out when.

Every device speaks the same loop of espeak-ng digit phrases (real speech: the transcriber's
detector opens sessions on it and the double recognises it), after a per-device lead of
silence and from a per-device point of the loop, so devices start at different times and say
different things at any moment. A frame is identified by content: the plan keeps the CRC-32 of
every loop frame, so the frames a session sent can be matched to the frames that were fed
(see :mod:`bench.frames`).
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from capture.contract import FRAME_BYTES, FRAME_SAMPLES, FRAME_US
from tests.support.speech import compose, digits_phrase

ZERO_CRC = zlib.crc32(bytes(FRAME_BYTES))


def speech_loop(seed: int = 7, phrases: int = 8) -> np.ndarray:
    """About 25 s of digit phrases separated by 0.5–1.5 s pauses (int16, 16 kHz, whole frames).

    Pauses stay well under the inactivity timeout, so a device that speaks this loop keeps its
    session open: "a device that is speaking".
    """
    rng = random.Random(seed)
    parts: list[str | float] = []
    for _ in range(phrases):
        parts.append(digits_phrase([rng.randrange(10) for _ in range(rng.randint(3, 6))]))
        parts.append(round(rng.uniform(0.5, 1.5), 2))
    return whole_frames(compose(*parts))


def whole_frames(samples: np.ndarray) -> np.ndarray:
    pad = (-len(samples)) % FRAME_SAMPLES
    return np.concatenate([samples, np.zeros(pad, dtype="<i2")]) if pad else samples


def frames_of(samples: np.ndarray) -> list[bytes]:
    data = np.asarray(samples, dtype="<i2").tobytes()
    return [data[i:i + FRAME_BYTES] for i in range(0, len(data), FRAME_BYTES)]


@dataclass(frozen=True)
class DevicePlan:
    name: str
    t0_us: int  # capture time (ts) of frame 0; frame n has ts = t0_us + n * 50 ms
    lead: int  # frames of digital silence before the loop starts
    offset: int  # loop frame the speech starts at


@dataclass(frozen=True)
class FeedPlan:
    start: float  # epoch seconds; every t0 lies in [start, start + 50 ms)
    frames: int  # frames per device
    loop_crc: tuple[int, ...]
    devices: tuple[DevicePlan, ...]

    def due(self, device: DevicePlan, n: int) -> float:
        """When frame ``n`` is complete and capture may publish it: ts + 50 ms (epoch s)."""
        return (device.t0_us + (n + 1) * FRAME_US) / 1e6

    def crcs(self, device: DevicePlan) -> np.ndarray:
        """CRC-32 of each frame fed to ``device``, in order."""
        loop = np.asarray(self.loop_crc, dtype=np.uint32)
        n = np.arange(self.frames)
        out = loop[(n - device.lead + device.offset) % len(loop)]
        out[n < device.lead] = ZERO_CRC
        return out

    def speaking_from(self, device: DevicePlan) -> int:
        return device.lead

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"start": self.start, "frames": self.frames,
                                    "loop_crc": list(self.loop_crc),
                                    "devices": [asdict(d) for d in self.devices]}))

    @classmethod
    def load(cls, path: Path) -> FeedPlan:
        data = json.loads(path.read_text())
        return cls(start=data["start"], frames=data["frames"],
                   loop_crc=tuple(data["loop_crc"]),
                   devices=tuple(DevicePlan(**d) for d in data["devices"]))


def make_plan(*, devices: int, seconds: float, start: float, loop_frames: list[bytes],
              lead_s: tuple[float, float], prefix: str = "bench", seed: int = 1,
              offsets: bool = True) -> FeedPlan:
    """Devices spread evenly over the 50 ms frame period, with random leads and (``offsets``)
    random starting points in the loop."""
    rng = random.Random(seed)
    frame_s = FRAME_US / 1e6
    plans = []
    for i in range(devices):
        lead = round(rng.uniform(*lead_s) / frame_s)
        plans.append(DevicePlan(
            name=f"{prefix}-{i:04d}",
            t0_us=int(start * 1e6) + i * FRAME_US // max(devices, 1),
            lead=lead, offset=rng.randrange(len(loop_frames)) if offsets else 0))
    return FeedPlan(start=start, frames=round(seconds / frame_s),
                    loop_crc=tuple(zlib.crc32(f) for f in loop_frames), devices=tuple(plans))
