"""Transcriber metrics (DESIGN §6 names are fixed). Labels stay bounded: device, reason, code."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_DURATION_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 10800)


@dataclass(frozen=True)
class TranscriberMetrics:
    sessions_started: Counter
    sessions_ended: Counter
    session_open: Gauge
    session_duration: Histogram
    billed_seconds: Counter
    speech_seconds: Counter
    silence_seconds: Gauge
    turns: Counter
    errors: Counter
    stream_lag: Gauge
    frames: Counter
    frames_skipped: Counter
    frames_gap: Counter
    device_owned: Gauge
    device_state: Gauge
    auth_failures: Counter
    budget_denied: Counter
    registry_problems: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> TranscriberMetrics:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ("device",)) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("device",)) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        return cls(
            sessions_started=counter("transcriber_sessions_started_total",
                                     "AssemblyAI sessions opened (Begin received)"),
            sessions_ended=counter("transcriber_sessions_ended_total",
                                   "AssemblyAI sessions ended, by reason", ("device", "reason")),
            session_open=gauge("transcriber_session_open", "1 while a session is open"),
            session_duration=Histogram("transcriber_session_duration_seconds",
                                       "Open time of ended sessions", ("device",),
                                       buckets=_DURATION_BUCKETS, registry=registry),
            billed_seconds=counter("transcriber_billed_seconds_total",
                                   "Session seconds billed (Termination, else measured)"),
            speech_seconds=counter("transcriber_speech_seconds_total",
                                   "Speech heard by the local voice-activity detector"),
            silence_seconds=gauge("transcriber_silence_seconds",
                                  "Seconds since the last local speech or non-empty transcript"),
            turns=counter("transcriber_turns_total", "Turns published", ("device", "final")),
            errors=counter("transcriber_errors_total",
                           "Session errors by close/error code", ("device", "code")),
            stream_lag=gauge("transcriber_stream_lag_seconds",
                             "Now minus the capture time of the newest frame handled"),
            frames=counter("transcriber_frames_total", "Audio frames read from the stream"),
            frames_skipped=counter("transcriber_frames_skipped_total",
                                   "Stream entries not used, by reason", ("device", "reason")),
            frames_gap=counter("transcriber_frames_missing_total",
                               "Frames missing from the stream (seq gaps)"),
            device_owned=gauge("transcriber_device_owned",
                               "1 while this worker handles the device"),
            device_state=gauge("transcriber_device_state",
                               "1 for the device's current lifecycle state", ("device", "state")),
            auth_failures=Counter("transcriber_auth_failures_total",
                                  "Sessions refused for the API key or account (close 1008)",
                                  registry=registry),
            budget_denied=counter("transcriber_session_budget_denied_total",
                                  "Session opens delayed by the shared new-session budget"),
            registry_problems=counter("transcriber_registry_problems_total",
                                      "Unusable ns:devices entries or device streams, each "
                                      "counted once, by kind", ("kind",)),
        )
