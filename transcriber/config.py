"""Transcriber settings: built once from the environment (and CLI flags), frozen, handed down."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from capture.common.env import env_bool, env_float, env_int, env_str, read_secret
from capture.common.errors import ConfigError
from capture.common.redisconn import redact_url, validate_redis_url
from capture.contract import DEFAULT_NAMESPACE

DEFAULT_AAI_URL = "wss://streaming.assemblyai.com/v3/ws"
DEFAULT_SPEECH_MODEL = "u3-rt-pro"
MAX_SESSION_S = 3 * 3600  # AssemblyAI's hard limit; Begin.expires_at tells the exact end


@dataclass(frozen=True)
class LifecycleSettings:
    """How a device's sessions open, stay open and end (DESIGN §4)."""

    inactivity_timeout_s: float = 5.0
    preroll_ms: int = 500
    terminate_timeout_s: float = 5.0  # bounded wait for Termination after Terminate
    connect_timeout_s: float = 10.0  # bounded wait for Begin
    rotate_after_s: float = MAX_SESSION_S - 600  # rotate at the next pause after this long
    rotate_hard_margin_s: float = 60.0  # rotate even mid-speech this close to expires_at
    catchup_burst_ms: int = 1000  # audio that may be sent ahead of real time after Begin
    max_unconfirmed_s: float = 120.0  # audio kept for resend since the last final turn
    reconnect_initial_s: float = 0.5
    reconnect_cap_s: float = 30.0
    auth_backoff_initial_s: float = 60.0  # after 1008: minutes, not a hot loop
    auth_backoff_cap_s: float = 900.0
    stale_after_s: float = 30.0  # idle frames older than this are skipped
    device_gone_after_s: float = 15.0  # no frames and no registry heartbeat for this long
    publish_partials: bool = False
    # Noise the detector takes for speech (a hum, a fan) must not keep a session open for
    # hours: without any non-empty transcript for this long, the session ends anyway.
    no_transcript_timeout_s: float = 30.0


@dataclass(frozen=True)
class TranscriberSettings:
    redis_url: str = field(repr=False)
    api_key: str = field(repr=False)
    namespace: str = DEFAULT_NAMESPACE
    aai_url: str = DEFAULT_AAI_URL
    speech_model: str = DEFAULT_SPEECH_MODEL
    format_turns: bool = True
    keyterms: tuple[str, ...] = ()
    metrics_port: int = 9102
    metrics_host: str = "0.0.0.0"  # noqa: S104 - inside a container, scraped over its network
    log_level: str = "INFO"
    worker_id: str = ""
    consumer_group: str = "transcribers"
    sessions_per_minute: int = 60
    max_devices: int = 1000
    lease_ttl_s: float = 10.0
    vad_mode: int = 2
    shutdown_timeout_s: float = 8.0
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)

    @property
    def redis_url_redacted(self) -> str:
        return redact_url(self.redis_url)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TranscriberSettings:
        redis_url = validate_redis_url(env_str(env, "REDIS_URL", "redis://localhost:6379/0"))
        api_key = read_secret(env, "ASSEMBLYAI_API_KEY")
        if api_key is None:
            raise ConfigError(
                "ASSEMBLYAI_API_KEY",
                "not set: set ASSEMBLYAI_API_KEY or ASSEMBLYAI_API_KEY_FILE (a file holding it)",
            )
        aai_url = env_str(env, "ASSEMBLYAI_URL", DEFAULT_AAI_URL)
        _validate_ws_url(aai_url)
        namespace = env_str(env, "EDGESCRIBE_NAMESPACE", DEFAULT_NAMESPACE)
        if any(c.isspace() for c in namespace) or "{" in namespace or "}" in namespace:
            raise ConfigError("EDGESCRIBE_NAMESPACE", f"{namespace!r} has spaces or braces")
        lifecycle = LifecycleSettings(
            inactivity_timeout_s=env_float(env, "INACTIVITY_TIMEOUT_S", 5.0, minimum=0.5,
                                           maximum=3600),
            preroll_ms=env_int(env, "TRANSCRIBER_PREROLL_MS", 500, minimum=0, maximum=5000),
            terminate_timeout_s=env_float(env, "TRANSCRIBER_TERMINATE_TIMEOUT_S", 5.0,
                                          minimum=0.1, maximum=60),
            connect_timeout_s=env_float(env, "TRANSCRIBER_CONNECT_TIMEOUT_S", 10.0, minimum=0.5,
                                        maximum=120),
            rotate_after_s=env_float(env, "TRANSCRIBER_ROTATE_AFTER_S", MAX_SESSION_S - 600,
                                     minimum=10, maximum=MAX_SESSION_S),
            catchup_burst_ms=env_int(env, "TRANSCRIBER_CATCHUP_BURST_MS", 1000, minimum=0,
                                     maximum=10_000),
            stale_after_s=env_float(env, "TRANSCRIBER_STALE_AFTER_S", 30.0, minimum=1),
            device_gone_after_s=env_float(env, "TRANSCRIBER_DEVICE_GONE_AFTER_S", 15.0,
                                          minimum=1),
            auth_backoff_initial_s=env_float(env, "TRANSCRIBER_AUTH_BACKOFF_S", 60.0,
                                             minimum=0.1),
            reconnect_initial_s=env_float(env, "TRANSCRIBER_RECONNECT_BACKOFF_S", 0.5,
                                          minimum=0.01),
            publish_partials=env_bool(env, "TRANSCRIBER_PARTIALS", False),
            no_transcript_timeout_s=env_float(env, "TRANSCRIBER_NO_TRANSCRIPT_TIMEOUT_S", 30.0,
                                              minimum=1),
        )
        return cls(
            redis_url=redis_url,
            api_key=api_key,
            namespace=namespace,
            aai_url=aai_url,
            speech_model=env_str(env, "ASSEMBLYAI_SPEECH_MODEL", DEFAULT_SPEECH_MODEL),
            format_turns=env_bool(env, "ASSEMBLYAI_FORMAT_TURNS", True),
            keyterms=_keyterms(env),
            metrics_port=env_int(env, "METRICS_PORT", 9102, minimum=0, maximum=65535),
            log_level=_log_level(env),
            worker_id=env_str(env, "TRANSCRIBER_WORKER_ID",
                              f"{socket.gethostname()}-{os.getpid()}"),
            sessions_per_minute=env_int(env, "TRANSCRIBER_SESSIONS_PER_MINUTE", 60, minimum=1,
                                        maximum=100_000),
            max_devices=env_int(env, "TRANSCRIBER_MAX_DEVICES", 1000, minimum=1),
            lease_ttl_s=env_float(env, "TRANSCRIBER_LEASE_TTL_S", 10.0, minimum=1, maximum=600),
            vad_mode=env_int(env, "TRANSCRIBER_VAD_MODE", 2, minimum=0, maximum=3),
            shutdown_timeout_s=env_float(env, "TRANSCRIBER_SHUTDOWN_TIMEOUT_S", 8.0, minimum=1,
                                         maximum=120),
            lifecycle=lifecycle,
        )


def _validate_ws_url(url: str) -> None:
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError("ASSEMBLYAI_URL", f"cannot parse {url!r}") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ConfigError("ASSEMBLYAI_URL", f"{url!r} must be a ws:// or wss:// URL with a host")
    if parts.username or parts.password:
        raise ConfigError("ASSEMBLYAI_URL", "must not carry credentials; use ASSEMBLYAI_API_KEY")


def _keyterms(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get("ASSEMBLYAI_KEYTERMS", "").strip()
    if not raw:
        return ()
    try:
        terms = json.loads(raw)
    except ValueError:
        problem = 'expected a JSON array like ["Acme","edge"]'
        raise ConfigError("ASSEMBLYAI_KEYTERMS", problem) from None
    if not isinstance(terms, list) or not all(isinstance(t, str) and t.strip() for t in terms):
        raise ConfigError("ASSEMBLYAI_KEYTERMS", "expected a JSON array of non-empty strings")
    if len(terms) > 100 or any(len(t) > 50 for t in terms):
        raise ConfigError("ASSEMBLYAI_KEYTERMS", "at most 100 terms of at most 50 characters")
    return tuple(terms)


def _log_level(env: Mapping[str, str]) -> str:
    level = env_str(env, "LOG_LEVEL", "INFO").upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError("LOG_LEVEL", f"expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
    return level
