"""One capture run: a source, the frame buffer, the publisher thread and the metrics endpoint.

Threads: the source's (the caller's thread for a WAV; PortAudio's callback thread for a mic)
only frames audio into the FrameBuffer; the ``publisher`` thread alone talks to Redis; the
``metrics-http`` thread serves /metrics and /healthz.

Shutdown (on EOF or ``stop``), in order and time-boxed:
1. the source stops (the mic stream is closed);
2. the last partial frame is padded with silence and buffered; the buffer is closed;
3. the publisher writes the backlog, then the end-of-stream entry, within ``flush_timeout_s``
   (what is left after that is counted as ``dropped{reason="shutdown"}``), then closes Redis;
4. the metrics server stops; one summary line is logged.
"""

from __future__ import annotations

import logging
import secrets
import threading
from typing import Any

import redis
from prometheus_client import CollectorRegistry
from redis.backoff import NoBackoff
from redis.retry import Retry

from capture.buffer import FrameBuffer
from capture.common.errors import ConfigError
from capture.common.redisconn import connect
from capture.common.runtime import EXIT_FAILURE, EXIT_OK, MetricsServer
from capture.config import CaptureSettings
from capture.contract import CHANNELS, SAMPLE_RATE_HZ, DeviceRecord, Keys
from capture.framing import Clock, Framer, Source
from capture.metrics import DROP_REASONS, CaptureMetrics
from capture.mic import MicSource, PyAudioFactory, default_pyaudio
from capture.publisher import Publisher, RedisFactory
from capture.wavfile import WavSource

log = logging.getLogger(__name__)

SOURCE_QUIET_S = 5.0  # /healthz: the source must have delivered audio this recently
SOURCE_GRACE_S = 15.0  # ... except right after start (PulseAudio needs 1-2 s to deliver)
REDIS_RECENT_S = 15.0  # /healthz: a Redis write succeeded this recently, or the buffer has room


def redis_factory_for(url: str) -> RedisFactory:
    """Real clients, with redis-py's own retries off: a pipeline re-sent by the library after a
    lost reply would duplicate entries; the publisher retries itself, without duplicates."""

    def factory() -> redis.Redis:
        client = connect(url)
        client.set_retry(Retry(NoBackoff(), 0))
        return client

    return factory


def build_source(settings: CaptureSettings, clock: Clock,
                 pa_factory: PyAudioFactory = default_pyaudio) -> Source:
    """The WAV replay or the opened microphone; raises ConfigError for a bad file or device."""
    if settings.file is not None:
        return WavSource(settings.file, realtime=settings.realtime, clock=clock)
    mic = MicSource(settings.input_device, setting=settings.setting_name("input_device"),
                    pa_factory=pa_factory, clock=clock, quiet=settings.log_level != "DEBUG")
    mic.open()
    return mic


class CaptureService:
    def __init__(self, settings: CaptureSettings, *, source: Source, redis_factory: RedisFactory,
                 registry: CollectorRegistry, clock: Clock, stop: threading.Event,
                 run_id: str | None = None) -> None:
        self.settings = settings
        self.run_id = run_id or secrets.token_hex(8)
        self._source = source
        self._clock = clock
        self._stop = stop
        self._registry = registry
        self.metrics = CaptureMetrics(registry, settings.device_id)
        self.buffer = FrameBuffer(settings.buffer_frames)
        self.framer = Framer(self.run_id, clock, self.buffer, self.metrics)
        record = DeviceRecord(run=self.run_id, rate=SAMPLE_RATE_HZ, channels=CHANNELS,
                              started=clock.wall(), seen=clock.wall(),
                              source=source.description)
        self.publisher = Publisher(
            keys=Keys(settings.namespace), device_id=settings.device_id, record=record,
            buffer=self.buffer, redis_factory=redis_factory, metrics=self.metrics, clock=clock,
            retention_frames=settings.retention_frames, batch_frames=settings.batch_frames)
        self._running = False
        self._started_mono = clock.monotonic()
        self.metrics.buffer_capacity.set(self.buffer.capacity)
        self.metrics.buffered.set_function(lambda: len(self.buffer))
        self.metrics.source_up.set_function(lambda: float(self._source_ok()))

    def run(self) -> int:
        """Capture until the source ends or ``stop`` is set.

        Returns 0, or 1 when the source failed or the backlog could not be written in time.
        """
        server = self._start_metrics_server()
        s = self.settings
        log.info("capture run %s: device %s from %s to %s (stream %s), buffer %d frames, "
                 "retention %d frames", self.run_id, s.device_id, self._source.description,
                 s.redis_url_safe, Keys(s.namespace).audio(s.device_id), self.buffer.capacity,
                 s.retention_frames)
        self._started_mono = self._clock.monotonic()
        self._running = True
        self.publisher.start()
        status = EXIT_OK
        try:
            self._source.run(self.framer, self._stop)
            if not self._stop.is_set():
                log.info("end of the source: stopping")
        except Exception:
            log.exception("the audio source failed")
            status = EXIT_FAILURE
        finally:
            self._running = False
            self._stop.set()
            eos = self.framer.finish()
            self.buffer.close()
            if not self.publisher.finish(eos, self.settings.flush_timeout_s):
                status = status or EXIT_FAILURE  # audio was lost: let a supervisor know
            if server is not None:
                server.stop()
            self._log_summary()
        return status

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while the source delivers audio and no audio is being lost for want of Redis:
        Redis was written to in the last REDIS_RECENT_S, or the local buffer still has room."""
        now = self._clock.monotonic()
        last_ok = self.publisher.last_ok
        redis_recent = last_ok is not None and now - last_ok < REDIS_RECENT_S
        source_ok = self._running and self._source_ok()
        ok = source_ok and (redis_recent or not self.buffer.full)
        return ok, {
            "source": self._source.description if source_ok else "not delivering audio",
            "redis_ok_s_ago": None if last_ok is None else round(now - last_ok, 1),
            "buffered": len(self.buffer), "capacity": self.buffer.capacity,
        }

    def _source_ok(self) -> bool:
        now = self._clock.monotonic()
        last = self.framer.last_audio
        if last is None:
            return now - self._started_mono < SOURCE_GRACE_S
        return now - last < SOURCE_QUIET_S

    def _start_metrics_server(self) -> MetricsServer | None:
        port = self.settings.metrics_port
        if port == 0:
            return None
        server = MetricsServer(self._registry, self.health, port=port)
        try:
            server.start()
        except OSError as exc:
            raise ConfigError(self.settings.setting_name("metrics_port"),
                              f"cannot listen on port {port}: {exc.strerror or exc}") from None
        return server

    def _log_summary(self) -> None:
        device = {"device": self.settings.device_id}

        def value(name: str, **labels: str) -> int:
            return int(self._registry.get_sample_value(name, {**device, **labels}) or 0)

        dropped = {r: value("capture_frames_dropped_total", reason=r) for r in DROP_REASONS}
        log.info("capture run %s finished: %d frames captured, %d published, %d dropped (%s); "
                 "at most %d of %d buffered; %.1f s", self.run_id,
                 value("capture_frames_total"), value("capture_frames_published_total"),
                 sum(dropped.values()), ", ".join(f"{r} {n}" for r, n in dropped.items()),
                 self.buffer.high_water, self.buffer.capacity,
                 self._clock.monotonic() - self._started_mono)
