"""``python -m bench.double_proc OUT.json``: the AssemblyAI double in its own process.

Like ``python -m tests.double`` (pacing check on, default burst allowance), plus:

- ``--recogniser cheap``: one word per loud stretch instead of the digit recogniser (DTW and
  verification by synthesis). Load benchmarks use it so that the double's recognition does not
  take the CPU the transcriber is measured on; turns, word times, pacing, every protocol check
  and the session bookkeeping stay the double's own.
- on SIGTERM it writes OUT.json: one summary per connection (times as epoch seconds, close
  code, audio seconds, the Termination sent, the final transcripts), without the audio.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capture.common.runtime import install_stop_signals
from tests.double.config import DoubleConfig
from tests.double.recognizer import DigitRecogniser, RecognisedWord, split_chunks
from tests.double.records import SessionRecord
from tests.double.server import DoubleServer
from tests.support.speech import RATE


class CheapRecogniser(DigitRecogniser):
    """The word ``one`` for every loud stretch: cheap, deterministic, with real word times."""

    def __init__(self) -> None:  # no templates to build
        pass

    def recognise(self, samples: np.ndarray, *, verify: bool = True,
                  mark_unverified: bool = False) -> list[RecognisedWord]:
        chunks = split_chunks(np.asarray(samples, dtype="<i2"))
        return [RecognisedWord("one", s * 1000 // RATE, e * 1000 // RATE, 0.98)
                for s, e in chunks]


def summary(record: SessionRecord, mono_to_epoch: float) -> dict[str, Any]:
    def epoch(t: float | None) -> float | None:
        return None if t is None else round(t + mono_to_epoch, 4)

    termination = next((m for m in record.sent if m.get("type") == "Termination"), None)
    errors = [m.get("error_code") for m in record.sent if m.get("type") == "Error"]
    return {
        "index": record.index, "user_agent": record.user_agent,
        "session_id": record.session_id, "accepted": record.accepted,
        "connected_at": epoch(record.connected_at), "begin_at": epoch(record.begin_at),
        "terminate_at": epoch(record.terminate_at), "closed_at": epoch(record.closed_at),
        "close_code": record.close_code, "close_reason": record.close_reason,
        "closed_by": record.closed_by, "audio_s": record.audio_seconds(),
        "audio_messages": record.audio_messages, "termination": termination,
        "errors": errors, "finals": record.final_transcripts(),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.double_proc")
    p.add_argument("out", type=Path)
    p.add_argument("--recogniser", choices=("digits", "cheap"), default="digits")
    p.add_argument("--decode-workers", type=int, default=2)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    install_stop_signals(stop)
    recogniser = CheapRecogniser() if args.recogniser == "cheap" else None
    config = DoubleConfig(decode_workers=args.decode_workers)  # pacing on, 2 s burst allowance
    with DoubleServer(config, recogniser=recogniser) as double:
        print(double.url, flush=True)
        while not stop.wait(1.0):
            pass
        mono_to_epoch = time.time() - time.monotonic()
        records = double.records()
    args.out.write_text(json.dumps([summary(r, mono_to_epoch) for r in records]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
