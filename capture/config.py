"""Capture settings: built once from the environment (and the few CLI flags), frozen, handed down.

Every value comes from an environment variable; a CLI flag, where one exists, overrides it. An
error names the flag or the variable that supplied the bad value.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from capture.common.env import env_bool, env_float, env_int, env_str
from capture.common.errors import ConfigError
from capture.common.redisconn import redact_url, validate_redis_url
from capture.contract import DEFAULT_NAMESPACE, FRAME_MS, is_valid_device_id
from capture.wavfile import WavError, probe_wav

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_METRICS_PORT = 9101
FRAMES_PER_SECOND = 1000 // FRAME_MS  # 20
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Environment variables owned by capture (the shared ones are in DESIGN §2).
ENV_INPUT_DEVICE = "CAPTURE_INPUT_DEVICE"
ENV_FILE = "CAPTURE_FILE"
ENV_REALTIME = "CAPTURE_REALTIME"
ENV_RETENTION_S = "CAPTURE_RETENTION_S"
ENV_BUFFER_S = "CAPTURE_BUFFER_S"
ENV_BATCH_FRAMES = "CAPTURE_BATCH_FRAMES"
ENV_FLUSH_TIMEOUT_S = "CAPTURE_FLUSH_TIMEOUT_S"


@dataclass(frozen=True)
class CaptureSettings:
    redis_url: str = field(default=DEFAULT_REDIS_URL, repr=False)
    """Redis connection URL; may hold a password, so never printed (see ``redis_url_safe``)."""
    namespace: str = DEFAULT_NAMESPACE
    """Prefix of every Redis key."""
    device_id: str = "default"
    """This microphone's id, ``[A-Za-z0-9_.-]{1,64}``."""
    metrics_port: int = DEFAULT_METRICS_PORT
    """Port of /metrics and /healthz; 0 disables both."""
    log_level: str = "INFO"
    input_device: str | None = None
    """PyAudio input device: an index or a case-insensitive name substring; None = the default."""
    file: Path | None = None
    """Replay this WAV instead of capturing from a microphone."""
    realtime: bool = True
    """Replay the WAV at real time (False: as fast as Redis takes it)."""
    retention_s: float = 60.0
    """Seconds of audio the Redis stream keeps (approximately: trimming is by whole nodes)."""
    buffer_s: float = 120.0
    """Seconds of audio buffered locally while Redis is unreachable; the oldest go first past it."""
    batch_frames: int = 200
    """Frames per pipelined write when catching up."""
    flush_timeout_s: float = 5.0
    """At shutdown, how long to try writing what is still buffered plus the end-of-stream entry."""
    origins: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    """Field name -> the flag or variable that set it (for error messages)."""

    @property
    def retention_frames(self) -> int:
        return max(1, round(self.retention_s * FRAMES_PER_SECOND))

    @property
    def buffer_frames(self) -> int:
        return max(1, round(self.buffer_s * FRAMES_PER_SECOND))

    @property
    def redis_url_safe(self) -> str:
        return redact_url(self.redis_url)

    def setting_name(self, field_name: str) -> str:
        return self.origins.get(field_name, field_name)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], args: argparse.Namespace | None = None, *,
        hostname: Callable[[], str] = socket.gethostname,
    ) -> CaptureSettings:
        flags = _Flags(env, args)
        origins: dict[str, str] = {}

        src, name = flags.pick("REDIS_URL", "redis_url", "--redis-url")
        redis_url = validate_redis_url(env_str(src, name, DEFAULT_REDIS_URL), name)

        namespace = env_str(env, "EDGESCRIBE_NAMESPACE", DEFAULT_NAMESPACE)

        src, name = flags.pick("DEVICE_ID", "device_id", "--device-id")
        raw_id = src.get(name, "").strip()
        device_id = raw_id or hostname()
        if not is_valid_device_id(device_id):
            pattern = "[A-Za-z0-9_.-]{1,64}"
            if raw_id:
                raise ConfigError(name, f"{device_id[:80]!r} must match {pattern}")
            raise ConfigError(name, f"not set, and the host name {device_id[:80]!r} does not "
                                    f"match {pattern}: set it")

        src, name = flags.pick("METRICS_PORT", "metrics_port", "--metrics-port")
        metrics_port = env_int(src, name, DEFAULT_METRICS_PORT, minimum=0, maximum=65535)

        log_level = env_str(env, "LOG_LEVEL", "INFO").upper()
        if log_level not in _LOG_LEVELS:
            setting = "LOG_LEVEL"
            raise ConfigError(setting, f"expected one of {', '.join(_LOG_LEVELS)}")

        src, name = flags.pick(ENV_INPUT_DEVICE, "device", "--device")
        input_device = src.get(name, "").strip() or None
        origins["input_device"] = name

        src, name = flags.pick(ENV_FILE, "file", "--file")
        file_text = src.get(name, "").strip()
        file = Path(file_text) if file_text else None
        origins["file"] = name
        if file is not None:
            try:
                probe_wav(file)
            except WavError as exc:
                raise ConfigError(name, str(exc)) from None

        realtime = env_bool(env, ENV_REALTIME, True)
        if args is not None and getattr(args, "realtime", None) is False:
            realtime = False

        retention_s = env_float(env, ENV_RETENTION_S, 60.0, minimum=1.0)
        buffer_s = env_float(env, ENV_BUFFER_S, 120.0, minimum=1.0)
        batch_frames = env_int(env, ENV_BATCH_FRAMES, 200, minimum=1, maximum=10_000)
        flush_timeout_s = env_float(env, ENV_FLUSH_TIMEOUT_S, 5.0, minimum=0.0, maximum=300.0)

        return cls(
            redis_url=redis_url, namespace=namespace, device_id=device_id,
            metrics_port=metrics_port, log_level=log_level, input_device=input_device,
            file=file, realtime=realtime, retention_s=retention_s, buffer_s=buffer_s,
            batch_frames=batch_frames, flush_timeout_s=flush_timeout_s, origins=origins,
        )


class _Flags:
    """Chooses, per setting, the CLI flag when given, else the environment variable."""

    def __init__(self, env: Mapping[str, str], args: argparse.Namespace | None) -> None:
        self._env = env
        self._args = args

    def pick(self, var: str, attr: str, flag: str) -> tuple[Mapping[str, str], str]:
        value = getattr(self._args, attr, None) if self._args is not None else None
        if value is not None:
            return {flag: str(value)}, flag
        return self._env, var


def metrics_port_for_healthcheck(env: Mapping[str, str], args: argparse.Namespace | None) -> int:
    """Only what ``--healthcheck`` needs, so a healthcheck never fails on unrelated settings."""
    src, name = _Flags(env, args).pick("METRICS_PORT", "metrics_port", "--metrics-port")
    port = env_int(src, name, DEFAULT_METRICS_PORT, minimum=0, maximum=65535)
    if port == 0:
        raise ConfigError(name, "is 0 (metrics and /healthz disabled): nothing to check")
    return port
