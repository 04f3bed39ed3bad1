"""Command-line flags of ``python -m capture``: only those a person at a terminal wants.

Everything is also (and for compose, better) set by environment variables; a flag wins over its
variable. A bad flag ends in one ``error: <flag>: <problem>`` line and status 2, as a bad
variable does.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn

from capture.common.errors import ConfigError

_EPILOG = """\
environment (a flag wins over its variable):
  REDIS_URL                redis://[user:password@]host:port/db  (default redis://localhost:6379/0)
  EDGESCRIBE_NAMESPACE     key prefix (default edgescribe:)
  DEVICE_ID                this microphone's id (default: the host name)
  METRICS_PORT             /metrics and /healthz port, 0 = off (default 9101)
  LOG_LEVEL                DEBUG, INFO, WARNING, ERROR (default INFO)
  CAPTURE_INPUT_DEVICE     input device index or name substring (default: the system default)
  CAPTURE_FILE             replay this WAV instead of a microphone
  CAPTURE_REALTIME         replay the WAV at real time: true/false (default true)
  CAPTURE_RETENTION_S      seconds of audio the Redis stream keeps (default 60)
  CAPTURE_BUFFER_S         seconds of audio kept locally while Redis is away (default 120)
  CAPTURE_BATCH_FRAMES     frames per pipelined write when catching up (default 200)
  CAPTURE_FLUSH_TIMEOUT_S  seconds to flush the buffer at shutdown (default 5)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        setting = "arguments"
        raise ConfigError(setting, message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m capture",
        description="Capture a microphone (or replay a WAV) as 50 ms frames into a Redis stream.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--file", metavar="WAV", help="replay this WAV instead of a microphone "
                        "(any PCM rate, channel count, 8/16/24/32-bit; converted to 16 kHz mono)")
    parser.add_argument("--no-realtime", dest="realtime", action="store_const", const=False,
                        default=None, help="replay the WAV as fast as possible")
    parser.add_argument("--list-devices", action="store_true",
                        help="print the input devices (index, name, channels, rate) and exit")
    parser.add_argument("--device", metavar="INDEX|NAME",
                        help="input device: an index from --list-devices or part of a name")
    parser.add_argument("--device-id", metavar="ID", help="this microphone's id (DEVICE_ID)")
    parser.add_argument("--redis-url", metavar="URL",
                        help="Redis URL. Prefer the REDIS_URL variable when it holds a password: "
                             "command lines are readable by every local user (/proc/PID/cmdline)")
    parser.add_argument("--metrics-port", metavar="PORT", help="metrics/health port, 0 = off")
    parser.add_argument("--healthcheck", action="store_true",
                        help="ask a running capture's /healthz on 127.0.0.1; exit 0 if healthy")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)
