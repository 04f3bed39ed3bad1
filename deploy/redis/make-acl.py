#!/usr/bin/env python3
"""Write a Redis 7 ACL file (``--aclfile``) with least-privilege users for edgescribe.

    python deploy/redis/make-acl.py --secrets DIR [--generate] [--out users.acl] DEVICE...

Users (see README.md, "Securing Redis" for exactly what each may do):
  default          off: a connection without credentials can run nothing
  admin            everything, for operators (redis-cli --user admin)
  transcriber      what `python -m transcriber` needs, and no more
  capture-DEVICE   one per microphone: its own audio stream, write-only on the registry

Passwords are read from files in DIR named after the user (DIR/admin, DIR/transcriber,
DIR/capture-kitchen, ...), one password per file. ``--generate`` creates the missing ones
(48 hex characters, mode 0600); existing files are never overwritten. The ACL file holds only
SHA-256 hashes of the passwords, never the passwords.

Standard library only, so it runs on any machine with Python 3.9+.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import secrets
import sys
from pathlib import Path

DEFAULT_NAMESPACE = "edgescribe:"
# capture.contract.is_valid_device_id. No ACL glob characters (* ? [ ] \) can occur in it.
class Refused(Exception):
    """A problem with the input: one line on stderr, exit status 2."""


DEVICE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# A stricter namespace than the services accept: it is pasted into ACL key patterns, where
# * ? [ ] \ would widen them, and into a line Redis splits at spaces.
NAMESPACE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def capture_rules(ns: str, device: str) -> list[str]:
    """capture/publisher.py: XADD (MAXLEN ~) and, after a failed write, XREVRANGE on its own
    stream; HSET of its record in the registry. PING: redis-py's health check."""
    return ["+ping", "+select", f"~{ns}audio:{{{device}}}", "+xadd", "+xrevrange",
            # Write-only, and HSET only: it can neither read the registry nor delete fields.
            f"(%W~{ns}devices +hset)"]


def transcriber_rules(ns: str) -> list[str]:
    """transcriber/: worker.py, publisher.py, lease.py, budget.py (and their Lua scripts)."""
    return [
        "+ping", "+select", "+multi", "+exec", "+discard", "+script|load", "+time",
        # Discovery reads the registry; the audio streams are consumed through a group.
        f"%R~{ns}devices", "+hgetall",
        f"~{ns}audio:{{*}}", "+xgroup|create", "+xreadgroup", "+xack", "+xautoclaim",
        # XADD only here: a transcriber cannot write into a device's audio stream.
        f"(%W~{ns}turns %W~{ns}sessions +xadd)",
        # Leases with fencing tokens, publish sequence numbers and the session budget,
        # directly and from Lua.
        f"(~{ns}lease:{{*}} ~{ns}fence:{{*}} ~{ns}published:{{*}} ~{ns}session_budget +get +set"
        " +exists +incrby +del +pexpire +evalsha +eval +zremrangebyscore +zcard +zadd +zrange)",
        # The fenced publish script names the lease, the device's audio and the output streams.
        f"(~{ns}lease:{{*}} ~{ns}fence:{{*}} ~{ns}published:{{*}} ~{ns}audio:{{*}} ~{ns}turns"
        f" ~{ns}sessions +evalsha +eval)",
        # Hostile-input checks: is a key the stream it should be?
        f"(%R~{ns}turns %R~{ns}sessions %R~{ns}audio:{{*}} +type)",
        # Replica announcements for spreading devices.
        f"(~{ns}workers +evalsha +eval +hset +hgetall +hdel)",
    ]


def acl_lines(ns: str, passwords: dict[str, str], devices: list[str]) -> list[str]:
    def user(name: str, rules: list[str]) -> str:
        digest = hashlib.sha256(passwords[name].encode()).hexdigest()
        return " ".join(["user", name, "reset", "on", f"#{digest}", *rules])

    lines = ["user default reset off",
             user("admin", ["~*", "&*", "+@all"]),
             user("transcriber", transcriber_rules(ns))]
    lines += [user(f"capture-{d}", capture_rules(ns, d)) for d in devices]
    return lines


def read_passwords(directory: Path, users: list[str], generate: bool) -> dict[str, str]:
    passwords: dict[str, str] = {}
    for name in users:
        path = directory / name
        if not path.exists() and generate:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(24) + "\n")
        try:
            password = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            hint = " (--generate creates missing ones)" if not generate else ""
            raise Refused(f"password of {name}: cannot read {path}: {exc.strerror}{hint}") from None
        if not password or any(c.isspace() for c in password):
            raise Refused(f"password of {name}: {path} is empty or has spaces")
        passwords[name] = password
    return passwords


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, readable by its owner only."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make-acl.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("devices", nargs="+", metavar="DEVICE",
                        help="device id of each microphone (its DEVICE_ID)")
    parser.add_argument("--secrets", required=True, type=Path, metavar="DIR",
                        help="directory of password files, one per user")
    parser.add_argument("--generate", action="store_true",
                        help="create missing password files with random passwords")
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE,
                        help=f"EDGESCRIBE_NAMESPACE of the services (default {DEFAULT_NAMESPACE})")
    parser.add_argument("--out", type=Path, help="write here (mode 0600) instead of stdout")
    args = parser.parse_args(argv)

    if not NAMESPACE.fullmatch(args.namespace):
        parser.error(f"--namespace {args.namespace!r} must match {NAMESPACE.pattern}")
    for device in args.devices:
        if not DEVICE_ID.fullmatch(device):
            parser.error(f"device id {device!r} must match {DEVICE_ID.pattern}")
    devices = sorted(set(args.devices))
    users = ["admin", "transcriber", *(f"capture-{d}" for d in devices)]
    try:
        passwords = read_passwords(args.secrets, users, args.generate)
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = "".join(f"{line}\n" for line in acl_lines(args.namespace, passwords, devices))
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_private(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
