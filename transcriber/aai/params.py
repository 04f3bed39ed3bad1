"""Session parameters of AssemblyAI Universal Streaming v3 and the URL that carries them.

All configuration travels in the query string (there is no start message). ``speech_model`` and
``format_turns`` are always sent because their server defaults changed over time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

#: Bytes per sample of each supported encoding.
ENCODINGS = {"pcm_s16le": 2, "pcm_mulaw": 1}
MAX_KEYTERMS = 100
MAX_KEYTERM_CHARS = 50


def validate_keyterms(terms: object) -> tuple[str, ...]:
    """``terms`` as a tuple, or ValueError saying what is wrong with it."""
    if isinstance(terms, str) or not isinstance(terms, list | tuple):
        raise ValueError("keyterms_prompt must be a list of strings")  # noqa: TRY004 one error type for callers
    if len(terms) > MAX_KEYTERMS:
        raise ValueError(f"keyterms_prompt has {len(terms)} terms; at most {MAX_KEYTERMS} allowed")
    for term in terms:
        if not isinstance(term, str) or not term.strip():
            raise ValueError(f"keyterms_prompt holds {term!r}; "
                             "every term must be a non-empty string")
        if len(term) > MAX_KEYTERM_CHARS:
            raise ValueError(f"keyterm {term[:20]!r}… has {len(term)} characters; "
                             f"at most {MAX_KEYTERM_CHARS} allowed")
    return tuple(terms)


@dataclass(frozen=True)
class StreamingParams:
    speech_model: str = "u3-rt-pro"
    sample_rate: int = 16000
    """Hz; must match the audio sent."""
    encoding: str = "pcm_s16le"
    format_turns: bool = True
    keyterms_prompt: tuple[str, ...] = ()
    """Sent as one parameter holding a JSON array (≤ 100 terms, ≤ 50 characters each)."""
    end_of_turn_confidence_threshold: float | None = None
    min_turn_silence_ms: int | None = None
    """Sent as ``min_turn_silence``."""
    max_turn_silence_ms: int | None = None
    """Sent as ``max_turn_silence``."""

    def __post_init__(self) -> None:
        if not self.speech_model or any(c.isspace() for c in self.speech_model):
            raise ValueError(f"speech_model {self.speech_model!r} is not a model name")
        if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, int) \
                or not 8000 <= self.sample_rate <= 48000:
            raise ValueError(f"sample_rate {self.sample_rate!r} must be an integer 8000–48000 Hz")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding {self.encoding!r} is not one of {', '.join(ENCODINGS)}")
        object.__setattr__(self, "keyterms_prompt", validate_keyterms(self.keyterms_prompt))
        threshold = self.end_of_turn_confidence_threshold
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"end_of_turn_confidence_threshold {threshold} must be within 0–1")
        for name in ("min_turn_silence_ms", "max_turn_silence_ms"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} {value!r} must be a non-negative integer")
        low, high = self.min_turn_silence_ms, self.max_turn_silence_ms
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_turn_silence_ms {low} exceeds max_turn_silence_ms {high}")

    @property
    def bytes_per_sample(self) -> int:
        return ENCODINGS[self.encoding]

    def query(self) -> list[tuple[str, str]]:
        """The query parameters, in a stable order."""
        pairs = [
            ("speech_model", self.speech_model),
            ("sample_rate", str(self.sample_rate)),
            ("encoding", self.encoding),
            ("format_turns", "true" if self.format_turns else "false"),
        ]
        if self.keyterms_prompt:
            pairs.append(("keyterms_prompt", json.dumps(list(self.keyterms_prompt))))
        if self.end_of_turn_confidence_threshold is not None:
            pairs.append(("end_of_turn_confidence_threshold",
                          f"{self.end_of_turn_confidence_threshold:g}"))
        if self.min_turn_silence_ms is not None:
            pairs.append(("min_turn_silence", str(self.min_turn_silence_ms)))
        if self.max_turn_silence_ms is not None:
            pairs.append(("max_turn_silence", str(self.max_turn_silence_ms)))
        return pairs


def build_url(base_url: str, params: StreamingParams) -> str:
    """``base_url`` (ws:// or wss://, e.g. ``wss://streaming.assemblyai.com/v3/ws``) with the
    session parameters in its query; parameters already in ``base_url`` are kept unless ours
    replace them."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"streaming URL {base_url!r} must start with ws:// or wss:// "
                         "and name a host")
    ours = params.query()
    names = {name for name, _ in ours}
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in names]
    query = urlencode(kept + ours, quote_via=quote)
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))
