"""Configuration of the AssemblyAI double: behaviour, timing and fault injection."""

from __future__ import annotations

from dataclasses import dataclass, field

U3 = "u3-rt-pro"
UNIVERSAL = "universal-streaming-english"
#: Every ``speech_model`` the double accepts (the SDK 1.8.2 enum); other names get Error 3006.
SPEECH_MODELS = frozenset({
    "u3-rt-pro", "u3-rt-pro-beta-1", "u3-pro", "universal-3-5-pro", "universal-3-6",
    "universal-3-6-pro", "universal-streaming-english", "universal-streaming-multilingual",
    "whisper-rt",
})


def behaviour_of(speech_model: str) -> str:
    """U3-Pro-style turns for the U3/Universal-3 family, Universal-Streaming-style otherwise."""
    return UNIVERSAL if speech_model.startswith(("universal-streaming", "whisper")) else U3


@dataclass(frozen=True)
class DoubleConfig:
    # Authentication
    api_keys: tuple[str, ...] = field(default=("test-key",), repr=False)
    """Accepted in the ``Authorization`` header or the ``token`` query parameter."""
    reject_auth_with_http_401: bool = False
    """Refuse a bad key at the HTTP level (401) instead of Error+close 1008 after the upgrade."""

    # Turn behaviour
    mode: str | None = None
    """``"u3-rt-pro"`` or ``"universal-streaming-english"`` to force one behaviour; None
    follows each session's ``speech_model``."""
    second_formatted_final: bool = False
    """Universal mode with format_turns=true: send the end of turn unformatted, then again
    formatted with the same turn_order (the behaviour before 2026-03-20)."""
    speech_started: bool = True
    """U3 mode: send SpeechStarted at the onset of each turn."""
    partial_silence_ms: int = 200
    """A pause this long inside a turn gives a partial (client's ``min_turn_silence`` wins)."""
    end_of_turn_silence_ms: int = 500
    """Silence that ends a turn (client's ``max_turn_silence`` wins). espeak-ng digit phrases
    have pauses of ≤ 60 ms between words, so anything from ~150 ms keeps a phrase in one turn."""
    early_partial_ms: int | None = 750
    """U3 mode: one partial after this much continuous speech (None: never)."""
    universal_partial_interval_ms: int = 1000
    """Universal mode: a partial per this much turn audio while speech goes on."""
    speech_threshold_rms: float = 300.0
    """A 10 ms frame with an RMS above this (int16 units) is speech."""
    min_speech_ms: int = 60
    """Shorter bursts are clicks, not turns."""
    turn_padding_ms: int = 150
    """Audio decoded before the onset and after the last speech frame of a turn."""

    strict_audio: bool = True
    """A turn ended by silence whose audio is not exactly espeak-ng's rendering of the digits
    recognised (lost, duplicated or reordered frames; also noise, gain, another voice or rate)
    gets the word ``garbled`` appended, so damaged audio changes the text. Word confidence
    tells the same (0.98 exact, 0.62 not) when this is off."""

    # Limits
    burst_allowance_s: float = 2.0
    """Audio may run ahead of the wall clock since Begin by this much before Error 3007."""
    enforce_pacing: bool = True
    max_session_s: float = 10800.0
    """``expires_at`` = Begin + this; at that time Error 3008 + close 3008."""
    expiry: str = "error"
    """What expiry sends (the docs disagree): ``"error"`` Error 3008 + close 3008 (errors
    page); ``"termination"`` Termination + close 1000 (message page); ``"both"`` Termination,
    then Error 3008 + close 3008."""

    # Faults
    begin_delay_s: float = 0.0
    close_before_begin: tuple[int, str] | None = None
    """Close every connection with (code, reason) instead of sending Begin."""
    reject_first: int = 0
    """Refuse this many connections (after the upgrade) with ``reject_code``."""
    reject_code: int = 3009
    reject_reason: str = "Unauthorized Connection: Too many concurrent sessions"
    ignore_terminate: bool = False
    """Never answer Terminate (keep the socket open)."""
    error_after_s: float | None = None
    """Error 3005 + close 3005 this long after Begin."""
    drop_after_s: float | None = None
    """Drop the TCP connection (no close frame) this long after Begin."""

    # Resources
    keep_audio: bool = True
    """Record every audio byte per session (``SessionRecord.audio``); turn off for long
    benchmarks with many sessions (32 kB per second per session)."""
    decode_workers: int = 2
    voice: str = "en-us"
    words_per_minute: int = 150
    """The speech the recogniser is built for (tests.support.speech defaults)."""

    def __post_init__(self) -> None:
        if self.mode not in (None, U3, UNIVERSAL):
            raise ValueError(f"mode must be None, {U3!r} or {UNIVERSAL!r}, not {self.mode!r}")
        if not self.api_keys:
            raise ValueError("api_keys must hold at least one key")
        if not 0 < self.partial_silence_ms <= self.end_of_turn_silence_ms:
            raise ValueError("need 0 < partial_silence_ms <= end_of_turn_silence_ms")
        if self.expiry not in ("error", "termination", "both"):
            raise ValueError(f"expiry must be error, termination or both, not {self.expiry!r}")
        if self.decode_workers < 1:
            raise ValueError("decode_workers must be at least 1")
