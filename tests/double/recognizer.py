"""The double's speech recogniser: spoken digits made by espeak-ng, recognised exactly.

Why not pocketsphinx: with its bundled en-us model and a digits JSGF grammar it recognised only
28 % of espeak-ng en-us digit phrases exactly (≈90 % with the klatt voices) on this machine. The
tests need exact text, so the double uses a recogniser built for the one voice the tests speak:

1. Split the audio at quiet runs (``|x| <= 64`` for ≥ 100 ms; espeak's pauses inside a phrase are
   ≤ 60 ms) into chunks, trimmed exactly like :func:`tests.support.speech.speak` trims.
2. Recognise each chunk by one-pass dynamic time warping (connected-word DTW) of MFCC frames
   against templates of the ten digit words spoken alone (``two`` also with a stop closure in
   front, which is how it sounds after another word).
3. Verify by synthesis: speak the hypothesis and compare it with the chunk sample by sample (sox
   dither makes two renderings differ by ±1–2 LSB). On a mismatch, rank single-word edits of
   the hypothesis by forced-alignment cost and verify the best few (≈ 0.5 s).

Measured on this machine (espeak-ng en-us, 150 wpm, 1–10 random digits): DTW alone 3000/3000
phrases exact; with verification 1500/1500 exact and verified.

Audio that was lost, duplicated or reordered fails verification and is transcribed by DTW alone,
so its text is usually wrong, as with a real service. Word times are 10 ms frames.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tests.support.speech import DIGIT_WORDS, RATE, digits_phrase, speak

QUIET = 64                 # |sample| ≤ this is silence (the threshold speak() trims at)
CHUNK_GAP_MS = 100         # a quiet run this long separates two chunks
FRAME = 160                # 10 ms hop at 16 kHz
WINDOW = 400               # 25 ms analysis window
_RANKED_CANDIDATES = 80    # single-word edits ranked after a failed verification (subs first)
_VERIFY_CANDIDATES = 4     # best-ranked edits checked by synthesis
_CACHE_SIZE = 4096
GARBLED = "garbled"        # marks a chunk that is not exactly what espeak-ng says


@dataclass(frozen=True)
class RecognisedWord:
    text: str
    start_ms: int          # from the start of the audio given to recognise()
    end_ms: int
    confidence: float


Synthesiser = Callable[[str], np.ndarray]


def _mel_filterbank(n_fft: int = 512, n_mel: int = 26, low: float = 100.0,
                    high: float = 7000.0) -> np.ndarray:
    def to_mel(hz: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    def to_hz(mel: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    mels = np.linspace(to_mel(np.array(low)), to_mel(np.array(high)), n_mel + 2)
    bins = np.floor((n_fft + 1) * to_hz(mels) / RATE).astype(int)
    bank = np.zeros((n_mel, n_fft // 2 + 1))
    for i in range(n_mel):
        a, b, c = bins[i], bins[i + 1], bins[i + 2]
        bank[i, a:b] = (np.arange(a, b) - a) / max(b - a, 1)
        bank[i, b:c] = (c - np.arange(b, c)) / max(c - b, 1)
    return bank


_BANK = _mel_filterbank()
_DCT = np.cos(np.pi / 26 * (np.arange(26)[None, :] + 0.5) * np.arange(13)[:, None])
_HAMMING = np.hamming(WINDOW)


def features(samples: np.ndarray) -> np.ndarray:
    """13 MFCCs per 10 ms frame, shape (frames, 13)."""
    x = samples.astype(np.float64)
    if x.size == 0:
        return np.zeros((0, 13))
    x = np.append(x[0], x[1:] - 0.97 * x[:-1])
    n = 1 + max(0, (x.size - WINDOW) // FRAME)
    x = np.pad(x, (0, max(0, (n - 1) * FRAME + WINDOW - x.size)))
    idx = np.arange(WINDOW)[None, :] + FRAME * np.arange(n)[:, None]
    power = np.abs(np.fft.rfft(x[idx] * _HAMMING, 512)) ** 2
    return np.log(power @ _BANK.T + 1e-3) @ _DCT.T


def split_chunks(samples: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) sample ranges of loud stretches separated by ≥ CHUNK_GAP_MS of quiet."""
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > QUIET)
    if loud.size == 0:
        return []
    gap = CHUNK_GAP_MS * RATE // 1000
    breaks = np.flatnonzero(np.diff(loud) > gap)
    starts = np.concatenate([[loud[0]], loud[breaks + 1]])
    ends = np.concatenate([loud[breaks], [loud[-1]]]) + 1
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


class _Templates:
    """Concatenated template frames of every word variant, for vectorised DTW."""

    def __init__(self, variants: Sequence[tuple[int, np.ndarray]]) -> None:
        self.word_of_variant = np.array([word for word, _ in variants])
        sizes = np.array([len(f) for _, f in variants])
        self.starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.ends = self.starts + sizes - 1
        self.frames = np.concatenate([f for _, f in variants])
        self.sq = (self.frames ** 2).sum(1)
        self.is_start = np.zeros(len(self.frames), dtype=bool)
        self.is_start[self.starts] = True
        self.second = np.zeros(len(self.frames), dtype=bool)
        self.second[self.starts + 1] = True
        self.by_word: dict[int, np.ndarray] = {}
        for word, f in variants:
            self.by_word.setdefault(word, f)

    def distances(self, frames: np.ndarray) -> np.ndarray:
        sq = (frames ** 2).sum(1)[:, None] + self.sq[None, :] - 2.0 * frames @ self.frames.T
        return np.sqrt(np.maximum(sq, 0.0))


def _shift(values: np.ndarray, by: int, fill: float) -> np.ndarray:
    out = np.empty_like(values)
    out[:by] = fill
    out[by:] = values[:-by]
    return out


def one_pass_dtw(frames: np.ndarray, templates: _Templates) -> list[tuple[int, int, int]]:
    """Best word sequence for ``frames``: (word, first frame, last frame) per word.

    Within a word the path may stay, step or skip one template frame (0.5×–∞ time warp); a new
    word starts after the best-scoring word end of the previous frame.
    """
    n_frames = len(frames)
    if n_frames == 0:
        return []
    dist = templates.distances(frames)
    inf = np.inf
    cost = np.where(templates.is_start, dist[0], inf)
    entry = np.zeros(len(cost), dtype=np.int64)
    end_entries = [entry[templates.ends].copy()]
    end_costs = [cost[templates.ends].copy()]
    for t in range(1, n_frames):
        stay = cost
        step = _shift(cost, 1, inf)
        skip = _shift(cost, 2, inf)
        step[templates.is_start] = inf
        skip[templates.is_start | templates.second] = inf
        choice = np.argmin(np.stack([stay, step, skip]), axis=0)
        best = np.choose(choice, [stay, step, skip])
        new_entry = np.choose(choice, [entry, _shift(entry, 1, 0), _shift(entry, 2, 0)])
        word_end = end_costs[-1]
        k = int(np.argmin(word_end))
        enter = word_end[k] < best[templates.starts]
        best[templates.starts[enter]] = word_end[k]
        new_entry[templates.starts[enter]] = t
        cost = best + dist[t]
        entry = new_entry
        end_entries.append(entry[templates.ends].copy())
        end_costs.append(cost[templates.ends].copy())
    words: list[tuple[int, int, int]] = []
    t = n_frames - 1
    k = int(np.argmin(end_costs[t]))
    while t >= 0:
        start = int(end_entries[t][k])
        words.append((int(templates.word_of_variant[k]), start, t))
        t = start - 1
        if t >= 0:
            k = int(np.argmin(end_costs[t]))
    words.reverse()
    return words


def forced_alignment(frames: np.ndarray, sequence: Sequence[np.ndarray],
                     *, with_starts: bool = True) -> tuple[float, list[int]]:
    """DTW cost of ``frames`` against templates in this order, and (``with_starts``) the
    first frame of each word."""
    ref = np.concatenate(sequence)
    sq = (frames ** 2).sum(1)[:, None] + (ref ** 2).sum(1)[None, :] - 2.0 * frames @ ref.T
    dist = np.sqrt(np.maximum(sq, 0.0))
    inf = np.inf
    cost = np.full(len(ref), inf)
    cost[0] = dist[0, 0]
    if not with_starts:
        step = np.empty_like(cost)
        for t in range(1, len(frames)):
            step[0] = inf
            np.minimum(cost[1:], cost[:-1], out=step[1:])
            np.minimum(step[2:], cost[:-2], out=step[2:])
            cost = step + dist[t]
        return float(cost[-1]), []
    back = np.zeros((len(frames), len(ref)), dtype=np.int8)
    for t in range(1, len(frames)):
        options = np.stack([cost, _shift(cost, 1, inf), _shift(cost, 2, inf)])
        back[t] = np.argmin(options, axis=0)
        cost = options[back[t], np.arange(len(ref))] + dist[t]
    # Walk the path back; a word starts at the earliest frame aligned to one of its frames.
    owner = np.repeat(np.arange(len(sequence)), [len(s) for s in sequence])
    starts = [0] * len(sequence)
    j = len(ref) - 1
    for t in range(len(frames) - 1, -1, -1):
        starts[owner[j]] = t
        if t:
            j -= int(back[t, j])
    return float(cost[-1]), starts


def _same_audio(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal but for sox's dither (±2 LSB), which can also move the trimmed edges where the
    signal is near the trim threshold: align on the first loud sample, ignore the edges."""
    if abs(a.size - b.size) > 200 or min(a.size, b.size) < 400:
        return False
    a32, b32 = a.astype(np.int32), b.astype(np.int32)
    loud_a = np.flatnonzero(np.abs(a32) > 1000)
    loud_b = np.flatnonzero(np.abs(b32) > 1000)
    if loud_a.size == 0 or loud_b.size == 0:
        return False
    shift = int(loud_a[0]) - int(loud_b[0])
    x = a32[max(shift, 0):]
    y = b32[max(-shift, 0):]
    n = min(x.size, y.size) - 100
    return n > 0 and int(np.abs(x[100:n] - y[100:n]).max()) <= 4 and \
        abs((a.size - b.size) - shift) <= 200


class DigitRecogniser:
    """Thread-safe; build once (about 0.3 s: ten espeak-ng calls) and share."""

    def __init__(self, voice: str = "en-us", words_per_minute: int = 150,
                 synthesise: Synthesiser | None = None, verify: bool = True) -> None:
        if synthesise is None:
            missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
            if missing:
                raise RuntimeError(f"the double's recogniser needs {' and '.join(missing)} "
                                   "(scripts/install-system-deps installs them)")

            def synthesise(text: str) -> np.ndarray:
                return speak(text, voice=voice, words_per_minute=words_per_minute)

        self._synthesise = synthesise
        self._verify = verify
        isolated = [features(synthesise(word)) for word in DIGIT_WORDS]
        variants: list[tuple[int, np.ndarray]] = list(enumerate(isolated))
        for word_index, word in enumerate(DIGIT_WORDS):
            # Inside a phrase a word is shorter and flatter than alone: cut the middle word out
            # of "w w w" (aligned against the isolated template) as a second template.
            frames = features(synthesise(f"{word} {word} {word}"))
            _, starts = forced_alignment(frames, [isolated[word_index]] * 3)
            if starts[2] - starts[1] >= 8:
                variants.append((word_index, frames[starts[1]:starts[2]]))
            if word == "two":
                # After another word "two" starts with a stop closure (60–100 ms).
                audio = synthesise(word)
                for closure_samples in (960, 1600):
                    closure = np.zeros(closure_samples, dtype="<i2")
                    variants.append((word_index, features(np.concatenate([closure, audio]))))
        self._templates = _Templates(variants)
        self._cache: OrderedDict[bytes, tuple[tuple[int, int, int], ...]] = OrderedDict()
        self._lock = threading.Lock()

    def recognise(self, samples: np.ndarray, *, verify: bool = True,
                  mark_unverified: bool = False) -> list[RecognisedWord]:
        """Words in ``samples`` (int16 mono 16 kHz), times relative to its first sample.

        Confidence is 0.98 for a chunk verified by synthesis, 0.62 otherwise. ``verify=False``
        skips the synthesis check (partials: audio cut mid-word). ``mark_unverified`` appends
        the word ``garbled`` after every chunk that failed verification, so that altered audio
        (lost, duplicated or reordered frames) changes the text, not just the confidence.
        """
        samples = np.asarray(samples, dtype="<i2")
        words: list[RecognisedWord] = []
        for start, end in split_chunks(samples):
            verified, spans = self._chunk(samples[start:end], verify and self._verify)
            offset_ms = start * 1000 // RATE
            end_ms = end * 1000 // RATE
            confidence = 0.98 if verified else 0.62
            for word, first, last in spans:
                words.append(RecognisedWord(
                    text=DIGIT_WORDS[word],
                    start_ms=offset_ms + first * 10,
                    end_ms=min(offset_ms + (last + 1) * 10, end_ms),
                    confidence=confidence,
                ))
            if mark_unverified and not verified:
                words.append(RecognisedWord(GARBLED, end_ms, end_ms, 0.1))
        return words

    def _chunk(self, chunk: np.ndarray,
               verify: bool) -> tuple[bool, tuple[tuple[int, int, int], ...]]:
        key = hashlib.blake2b(chunk.tobytes() + bytes([verify]), digest_size=16).digest()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit[0][0] == 1, hit[1:]
        frames = features(chunk)
        spans = one_pass_dtw(frames, self._templates)
        verified = False
        if verify and spans:
            verified, spans = self._verified(chunk, frames, spans)
        entry = ((1 if verified else 0, 0, 0), *spans)
        with self._lock:
            self._cache[key] = entry
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return verified, tuple(spans)

    def _verified(self, chunk: np.ndarray, frames: np.ndarray,
                  spans: list[tuple[int, int, int]]) -> tuple[bool, list[tuple[int, int, int]]]:
        best = tuple(word for word, _, _ in spans)
        if self._matches(chunk, best):
            return True, spans
        # One word away from the DTW result? Rank edits by forced-alignment cost (≈ 4 ms
        # each), verify the best few by synthesis (≈ 30 ms each).
        scored = []
        for candidate in _single_edits(best)[:_RANKED_CANDIDATES]:
            cost, _ = forced_alignment(frames, self._sequence(candidate), with_starts=False)
            scored.append((cost, candidate))
        scored.sort(key=lambda item: item[0])
        for _, candidate in scored[:_VERIFY_CANDIDATES]:
            if self._matches(chunk, candidate):
                _, starts = forced_alignment(frames, self._sequence(candidate))
                ends = [*(s - 1 for s in starts[1:]), len(frames) - 1]
                return True, [(w, s, max(s, e))
                              for w, s, e in zip(candidate, starts, ends, strict=True)]
        return False, spans

    def _sequence(self, words: Sequence[int]) -> list[np.ndarray]:
        return [self._templates.by_word[w] for w in words]

    def _matches(self, chunk: np.ndarray, words: Sequence[int]) -> bool:
        return _same_audio(chunk, self._synthesise(digits_phrase(words)))


def _single_edits(words: Sequence[int]) -> list[tuple[int, ...]]:
    """Every sequence one word away from ``words``: substitutions and deletions position by
    position, then insertions (substitutions are the common DTW error)."""
    seen: set[tuple[int, ...]] = set()
    out: list[tuple[int, ...]] = []
    base = list(words)
    edits: list[list[int]] = []
    for i in range(len(base)):
        edits.extend([*base[:i], d, *base[i + 1:]] for d in range(10) if d != base[i])
        edits.append(base[:i] + base[i + 1:])
    for i in range(len(base) + 1):
        edits.extend([*base[:i], d, *base[i:]] for d in range(10))
    for edit in edits:
        key = tuple(edit)
        if key and key not in seen:
            seen.add(key)
            out.append(key)
    return out
