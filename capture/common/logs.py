"""Logging set-up for the entry points, with secrets scrubbed from every record."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"


class SecretFilter(logging.Filter):
    """Replaces every known secret in a record's final message with ``***``.

    A last line of defence: code must not log secrets in the first place, but a third-party
    library echoing a URL or a header must not leak them either.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        scrubbed = message
        for secret in self._secrets:
            scrubbed = scrubbed.replace(secret, "***")
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        exc_text = record.exc_text
        if exc_text:
            for secret in self._secrets:
                exc_text = exc_text.replace(secret, "***")
            record.exc_text = exc_text
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True


def setup_logging(level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(SecretFilter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websocket-client logs frames at DEBUG, including the upgrade request and its headers.
    logging.getLogger("websocket").setLevel(max(logging.INFO, root.level))


class OncePerKind:
    """Logs the first occurrence of each kind of problem, counts the rest silently."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._seen: set[str] = set()

    def warning(self, kind: str, msg: str, *args: object) -> None:
        if kind in self._seen:
            return
        self._seen.add(kind)
        self._logger.warning("%s (further %s problems are counted, not logged)",
                             msg % args if args else msg, kind)
