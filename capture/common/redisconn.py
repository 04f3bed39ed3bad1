"""Redis connections from a URL: validated up front, never logged with their password."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from capture.common.errors import ConfigError

_SCHEMES = ("redis", "rediss", "unix")


def validate_redis_url(url: str, setting: str = "REDIS_URL") -> str:
    """URL unchanged if redis-py can use it, else a ConfigError that omits the password."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a non-numeric port
    except ValueError as exc:
        raise ConfigError(setting, f"cannot parse {redact_url(url)!r}: {exc}") from None
    if parts.scheme not in _SCHEMES:
        raise ConfigError(
            setting, f"{redact_url(url)!r} must start with redis://, rediss:// or unix://"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(setting, f"{redact_url(url)!r} names no host")
    if port == 0:
        raise ConfigError(setting, f"{redact_url(url)!r} names port 0")
    db = parts.path.lstrip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise ConfigError(setting, f"{redact_url(url)!r}: database must be a number, got {db!r}")
    try:
        # Builds a connection object without I/O: catches unknown or mistyped query options
        # (e.g. ssl_ca_certs on a redis:// URL) now, not as a retry loop later.
        redis.ConnectionPool.from_url(url).make_connection()
    except (TypeError, ValueError, redis.RedisError) as exc:
        raise ConfigError(setting, f"{redact_url(url)!r}: {exc}") from None
    return url


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (user names stay: they help debugging ACLs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]  # as written: ``parts.port`` raises on a bad port
    netloc = f"{user}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect(url: str, *, socket_timeout: float = 5.0, **kwargs: Any) -> redis.Redis:
    """A client for URL. Connections are lazy: nothing is contacted until the first command.

    One immediate retry only (a stale pooled connection after a Redis restart): our supervised
    loops own the backoff, and redis-py's default of three backed-off retries would stall a
    caller for seconds while Redis is down.
    """
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(socket_timeout, 2.0),
        health_check_interval=30,
        retry=Retry(NoBackoff(), 1),
        **kwargs,
    )


# What a supervised loop treats as "Redis is unavailable, back off and retry".
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    OSError,
)
