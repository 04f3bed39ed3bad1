"""Prometheus metrics of one capture process (DESIGN §6), on an injected registry.

Frame accounting, per device: every seq number of a run is exactly one of
``captured`` (entered the local buffer) or ``dropped{overflow|device}`` (lost before that), and
every captured frame ends as exactly one of ``published`` or ``dropped{buffer_full|shutdown}``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

# Bounded label values of capture_frames_dropped_total{reason}.
DROP_OVERFLOW = "overflow"  # the audio device overran (PortAudio paInputOverflow)
DROP_DEVICE = "device"  # the input stream failed and was reopened; the gap is counted
DROP_BUFFER_FULL = "buffer_full"  # Redis away longer than the local buffer holds
DROP_SHUTDOWN = "shutdown"  # still buffered when the shutdown flush ran out of time
DROP_REASONS = (DROP_OVERFLOW, DROP_DEVICE, DROP_BUFFER_FULL, DROP_SHUTDOWN)


class CaptureMetrics:
    """The capture metrics of one device, bound to its ``device`` label."""

    def __init__(self, registry: CollectorRegistry, device: str) -> None:
        labels = ("device",)
        self.frames = Counter(
            "capture_frames", "Frames (50 ms) captured into the local buffer.", labels,
            registry=registry).labels(device)
        self.published = Counter(
            "capture_frames_published", "Frames written to the device's Redis stream.", labels,
            registry=registry).labels(device)
        dropped = Counter(
            "capture_frames_dropped", "Frames lost, by reason; each lost frame's seq is skipped.",
            ("device", "reason"), registry=registry)
        self.dropped = {reason: dropped.labels(device, reason) for reason in DROP_REASONS}
        self.buffered = Gauge(
            "capture_buffered_frames", "Frames captured but not yet confirmed written to Redis.",
            labels, registry=registry).labels(device)
        self.buffer_capacity = Gauge(
            "capture_buffer_capacity_frames", "Frames the local buffer holds before dropping.",
            labels, registry=registry).labels(device)
        self.redis_up = Gauge(
            "capture_redis_up", "1 while the last Redis write succeeded, else 0.", labels,
            registry=registry).labels(device)
        self.redis_errors = Counter(
            "capture_redis_errors", "Failed Redis writes (each is retried with backoff).", labels,
            registry=registry).labels(device)
        self.lag = Gauge(
            "capture_publish_lag_seconds",
            "Wall time minus the capture time of the newest frame written to Redis.", labels,
            registry=registry).labels(device)
        self.source_up = Gauge(
            "capture_source_up", "1 while the audio source delivers audio, else 0.", labels,
            registry=registry).labels(device)
