"""Speech for the tests: espeak-ng digit phrases as 16 kHz mono s16le, with exact silences."""

from __future__ import annotations

import subprocess
import wave
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from tests.support.tools import require_tool

RATE = 16_000
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def speak(text: str, *, voice: str = "en-us", words_per_minute: int = 150) -> np.ndarray:
    """``text`` spoken by espeak-ng, as int16 samples at 16 kHz with espeak's padding trimmed."""
    return _speak_cached(text, voice, words_per_minute).copy()


@lru_cache(maxsize=256)
def _speak_cached(text: str, voice: str, words_per_minute: int) -> np.ndarray:
    espeak = require_tool("espeak-ng")
    sox = require_tool("sox")
    raw = subprocess.run(
        [espeak, "-v", voice, "-s", str(words_per_minute), "--stdout", text],
        check=True, capture_output=True,
    ).stdout
    pcm = subprocess.run(
        [sox, "-t", "wav", "-", "-t", "raw", "-r", str(RATE), "-c", "1", "-b", "16",
         "-e", "signed-integer", "-"],
        input=raw, check=True, capture_output=True,
    ).stdout
    samples = np.frombuffer(pcm, dtype="<i2")
    return _trim(samples)


def digits_phrase(digits: Sequence[int]) -> str:
    return " ".join(DIGIT_WORDS[d] for d in digits)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), dtype="<i2")


def compose(*parts: np.ndarray | float | str) -> np.ndarray:
    """Concatenate speech and silence: a float is seconds of silence, a str is spoken."""
    chunks = []
    for part in parts:
        if isinstance(part, str):
            chunks.append(speak(part))
        elif isinstance(part, float | int):
            chunks.append(silence(float(part)))
        else:
            chunks.append(np.asarray(part, dtype="<i2"))
    return np.concatenate(chunks) if chunks else silence(0)


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE, channels: int = 1) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.asarray(samples, dtype="<i2").tobytes())
    return path


def _trim(samples: np.ndarray, threshold: int = 64) -> np.ndarray:
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > threshold)
    if loud.size == 0:
        return samples[:0]
    return samples[loud[0]: loud[-1] + 1]
