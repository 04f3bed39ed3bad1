"""Cost of silence: billed session seconds per second of speech, and the words kept.

    .venv/bin/python -m bench.cost_of_silence

One recording (~3 min, ~15 % speech: espeak-ng digit phrases between pauses of 1.5–30 s) is
spoken at real time, at the same moment, by four clients of one double (own process, digit
recogniser, pacing check on):

- **edgescribe**: the feeder publishes it as a device, the real transcriber (own process,
  default settings: 5 s inactivity timeout, 500 ms pre-roll) opens and closes sessions;
- **always open**: one session for the whole recording (``bench.baselines``);
- **cookbook rule**, twice: inactivity checked only when a Turn arrives, with the product's
  default ``u3-rt-pro`` and with ``universal-streaming-english`` (the SDK-era model the
  cookbook was written for).

Billed time is what the double saw (Begin → close of each session; also the sum of the
``Termination``'s whole-second ``session_duration_seconds``). Recall: the spoken digits found,
in order, in the final transcripts (edgescribe: the turns it published to Redis). The ideal
lifecycle opens each session at speech onset − 500 ms and closes it 5 s after the last speech
(overlapping intervals merge).
"""

from __future__ import annotations

import difflib
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.audio import whole_frames
from bench.baselines import PacedClient
from bench.common import loadavg, machine, machine_line, md_table, write_result
from bench.stack import API_KEY, Stack
from capture.contract import Keys
from tests.support.speech import RATE, digits_phrase, silence, speak
from tests.support.transcribing import digits_of
from transcriber.aai.params import StreamingParams
from transcriber.records import SessionRecord, TurnRecord

LEAD_S = 3.0
TAIL_S = 8.0
# Pauses after each phrase: some shorter than the inactivity timeout (one session should
# cover both phrases), most much longer (a session should close in between).
GAPS_S = (2.0, 16.0, 3.0, 24.0, 8.0, 1.5, 28.0, 12.0, 2.5, 20.0, 26.0)
PREROLL_S = 0.5
INACTIVITY_S = 5.0
DEVICE = "cost-0000"
SETTLE_S = 8.0


def recording(seed: int = 11) -> tuple[np.ndarray, list[tuple[float, float]], list[int]]:
    """The samples, the (onset, end) of each phrase in seconds, and the digits spoken."""
    rng = random.Random(seed)
    parts = [silence(LEAD_S)]
    segments: list[tuple[float, float]] = []
    digits: list[int] = []
    at = LEAD_S
    for gap in (*GAPS_S, TAIL_S):
        phrase = [rng.randrange(10) for _ in range(rng.randint(5, 8))]
        speech = speak(digits_phrase(phrase))
        segments.append((at, at + len(speech) / RATE))
        digits += phrase
        parts += [speech, silence(gap)]
        at += len(speech) / RATE + gap
    return whole_frames(np.concatenate(parts)), segments, digits


def ideal(segments: list[tuple[float, float]], total_s: float) -> tuple[float, int]:
    """Billed seconds and sessions of the ideal lifecycle."""
    merged: list[list[float]] = []
    for on, off in segments:
        lo, hi = max(0.0, on - PREROLL_S), min(total_s, off + INACTIVITY_S)
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return sum(hi - lo for lo, hi in merged), len(merged)


def recalled(spoken: Sequence[int], heard: Sequence[int]) -> int:
    """Spoken digits found in order in what was heard (longest common subsequence, greedy)."""
    blocks = difflib.SequenceMatcher(None, list(spoken), list(heard), autojunk=False)
    return sum(b.size for b in blocks.get_matching_blocks())


def double_billing(records: list[dict[str, Any]], agent: str) -> dict[str, Any]:
    mine = [r for r in records if r["user_agent"] == agent and r["begin_at"] is not None]
    open_s = sum((r["closed_at"] or r["begin_at"]) - r["begin_at"] for r in mine)
    term = [r["termination"]["session_duration_seconds"] for r in mine if r["termination"]]
    codes = sorted({r["close_code"] for r in mine if r["close_code"] not in (1000, None)})
    return {"sessions": len(mine), "open_s": round(open_s, 2),
            "unclosed": sum(1 for r in mine if r["closed_at"] is None),
            "termination_s": sum(term), "terminated": len(term), "odd_close_codes": codes,
            "audio_s": round(sum(r["audio_s"] for r in mine), 2)}


def edgescribe_result(stack: Stack) -> dict[str, Any]:
    assert stack.redis is not None
    client = stack.redis.client()
    keys = Keys()
    raw_sessions: Any = client.xrange(keys.sessions)
    raw_turns: Any = client.xrange(keys.turns)
    sessions = [SessionRecord.from_fields(f) for _, f in raw_sessions]
    turns = sorted((TurnRecord.from_fields(f) for _, f in raw_turns), key=lambda t: t.start_ts)
    finals = [t.text for t in turns if t.final and t.device == DEVICE]
    return {"finals": finals,
            "sessions": [{"opened": s.opened, "closed": s.closed, "reason": s.reason.value,
                          "billed_s": s.billed_s} for s in sessions if s.device == DEVICE]}


def run(stack: Stack, samples: np.ndarray) -> dict[str, Any]:
    stack.start_redis()
    track = stack.path("recording.npy")
    np.save(track, samples)
    double = stack.double("digits")
    worker = stack.worker(double.url, {"BENCH_RECORD": "0"})
    start = time.time() + 3.0
    feeder = stack.feeder(devices=1, seconds=0, start=start, prefix="cost", track=track)
    universal = StreamingParams(speech_model="universal-streaming-english")
    clients = [PacedClient(name, double.url, api_key=API_KEY, params=params, samples=samples,
                           start=start, timeout_s=timeout)
               for name, params, timeout in (("always-open", StreamingParams(), None),
                                             ("cookbook-u3", StreamingParams(), INACTIVITY_S),
                                             ("cookbook-universal", universal, INACTIVITY_S))]
    for c in clients:
        c.start()
    fed = feeder.wait()
    for c in clients:
        c.join(30)
    time.sleep(SETTLE_S)
    worker.stop()
    records = double.stop()
    out: dict[str, Any] = {"feeder": fed, "edgescribe": {
        **edgescribe_result(stack), "double": double_billing(records, "edgescribe/0.1")}}
    for c in clients:
        out[c.name] = {**c.result(), "double": double_billing(records, f"bench-{c.name}")}
    return out


def summarise(raw: dict[str, Any], spoken: list[int], speech_s: float,
              ideal_s: float) -> list[dict[str, Any]]:
    rows = []
    for name in ("edgescribe", "always-open", "cookbook-u3", "cookbook-universal"):
        part = raw[name]
        finals = part["finals"] if name == "edgescribe" else [
            f for s in part["sessions"] for f in s["finals"]]
        heard = [d for text in finals for d in digits_of(text)]
        billed = part["double"]["open_s"]
        rows.append({
            "approach": name, "sessions": part["double"]["sessions"], "billed_s": billed,
            "termination_s": part["double"]["termination_s"],
            "billed_per_speech": round(billed / speech_s, 2),
            "unclosed_sessions": part["double"]["unclosed"],
            "vs_ideal": round(billed / ideal_s, 3),
            "recalled": recalled(spoken, heard), "spoken": len(spoken), "heard": len(heard),
            "garbled": sum(text.lower().count("garbled") for text in finals),
        })
    return rows


def table(rows: list[dict[str, Any]], ideal_row: dict[str, Any]) -> str:
    edgescribe = rows[0]["billed_s"]
    lines = [["ideal lifecycle", ideal_row["sessions"], f"{ideal_row['billed_s']:.1f}", "–",
              f"{ideal_row['billed_per_speech']:.2f}", "1.00", "–", "–"]]
    for r in rows:
        saving = ("–" if r["approach"] == "edgescribe" or not r["billed_s"]
                  else f"{1 - edgescribe / r['billed_s']:.0%}")
        lines.append([r["approach"], r["sessions"], f"{r['billed_s']:.1f}",
                      r["termination_s"], f"{r['billed_per_speech']:.2f}",
                      f"{r['vs_ideal']:.2f}", f"{r['recalled']}/{r['spoken']}", saving])
    return md_table(["approach", "sessions", "billed s (open)", "billed s (Termination)",
                     "billed ÷ speech", "× ideal", "digits recalled",
                     "edgescribe saves"], lines)


def main(argv: Sequence[str] | None = None) -> int:
    began = time.time()
    load_before = loadavg()
    samples, segments, spoken = recording()
    total_s = len(samples) / RATE
    speech_s = sum(off - on for on, off in segments)
    ideal_s, ideal_sessions = ideal(segments, total_s)
    with Stack() as stack:
        raw = run(stack, samples)
    rows = summarise(raw, spoken, speech_s, ideal_s)
    ideal_row = {"sessions": ideal_sessions, "billed_s": round(ideal_s, 2),
                 "billed_per_speech": round(ideal_s / speech_s, 2)}
    text = table(rows, ideal_row)
    print(f"\nCost of silence: {total_s:.0f} s recording, {speech_s:.1f} s speech "
          f"({speech_s / total_s:.0%}), {len(spoken)} digits in {len(segments)} phrases "
          f"({machine_line(machine())}; load before {load_before[0]:.2f})\n")
    print(text)
    edgescribe = rows[0]
    met = edgescribe["vs_ideal"] <= 1.15 and edgescribe["recalled"] == len(spoken)
    print(f"\ntarget (within 15 % of ideal, 100 % recall): {'met' if met else 'MISSED'}")
    path = write_result("cost_of_silence", {
        "recording_s": round(total_s, 2), "speech_s": round(speech_s, 2),
        "segments": segments, "spoken_digits": spoken, "ideal": ideal_row, "rows": rows,
        "target_met": met, "raw": raw, "load_before": load_before, "load_after": loadavg(),
        "wall_s": round(time.time() - began, 1), "table": text,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
