"""Security of the Redis link and of the processes' outputs (issue 7).

* ACL users from deploy/redis/make-acl.py, on a real redis-server: capture publishes as its own
  user and is refused everything else; the transcriber user can run every command the
  transcriber sends (its real classes, not a copy of their commands), and no more.
* The same users created inline by docker-compose.yml's Redis command.
* TLS: capture over ``rediss://`` with a throw-away CA; what a wrong URL does.
* No secret (Redis password, API key) in process arguments, /metrics, /healthz, logs or reprs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
import redis

from capture.common.errors import ConfigError
from capture.common.redisconn import connect, redact_url, validate_redis_url
from capture.config import CaptureSettings
from capture.contract import DeviceRecord, Keys, decode_entry
from tests.support.redisserver import RedisServer, free_port
from tests.support.speech import compose, write_wav
from tests.support.tls import TlsFiles, make_tls_files
from tests.support.tools import require_tool

ROOT = Path(__file__).resolve().parents[1]
MAKE_ACL = ROOT / "deploy" / "redis" / "make-acl.py"
NS = "edgescribe:"
KEYS = Keys(NS)
# Sentinels that must never show up where a person or a scraper can read them.
REDIS_PW = "s3cr3t-Redis-PW-42"
API_KEY = "sk-test-API-KEY-9f8e7d"
LOG_LINE = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ "


# --- servers and users -------------------------------------------------------------------------

class SecureRedis(RedisServer):
    """A RedisServer whose own client (also its readiness probe) logs in and speaks TLS.

    The base probe pings without credentials; with the default user off, NOAUTH arrives as
    ``redis.AuthenticationError``, a ``ConnectionError``, so it would wait until its timeout.
    """

    def __init__(self, binary: str, *, admin: tuple[str | None, str], extra_args: list[str],
                 port: int | None = None, tls: TlsFiles | None = None) -> None:
        super().__init__(binary, port=port, extra_args=extra_args)
        self.admin = admin
        self.tls = tls

    def url_for(self, user: str, password: str, *, scheme: str | None = None,
                query: dict[str, Path] | None = None) -> str:
        scheme = scheme or ("rediss" if self.tls else "redis")
        if query is None:
            query = {"ssl_ca_certs": self.tls.ca_cert} if self.tls else {}
        text = "&".join(f"{k}={quote(str(v))}" for k, v in query.items())
        return f"{scheme}://{user}:{password}@127.0.0.1:{self.port}/0{'?' if text else ''}{text}"

    def client(self) -> redis.Redis:
        user, password = self.admin
        tls: dict[str, Any] = {}
        if self.tls:  # the client certificate too, for servers that ask for one
            tls = {"ssl": True, "ssl_ca_certs": str(self.tls.ca_cert),
                   "ssl_certfile": str(self.tls.client_cert),
                   "ssl_keyfile": str(self.tls.client_key)}
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, username=user,
                           password=password, **tls)


def make_acl(tmp: Path, *args: str,
             passwords: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """deploy/redis/make-acl.py --generate, with ``passwords`` written first (others random)."""
    secrets_dir = tmp / "secrets"
    secrets_dir.mkdir(mode=0o700, exist_ok=True)
    for user, password in (passwords or {}).items():
        (secrets_dir / user).write_text(password + "\n")
    return subprocess.run(
        [sys.executable, str(MAKE_ACL), "--secrets", str(secrets_dir), "--generate",
         "--out", str(tmp / "users.acl"), *args],
        capture_output=True, text=True, timeout=30, check=False)


def secret(tmp: Path, user: str) -> str:
    return (tmp / "secrets" / user).read_text().strip()


@pytest.fixture
def acl_dir(tmp_path: Path) -> Path:
    result = make_acl(tmp_path, "kitchen", "hall", passwords={
        "capture-kitchen": REDIS_PW, "transcriber": f"{REDIS_PW}-transcriber"})
    assert result.returncode == 0, result.stderr
    return tmp_path


@pytest.fixture
def acl_server(acl_dir: Path) -> Iterator[SecureRedis]:
    server = SecureRedis(require_tool("redis-server"), admin=("admin", secret(acl_dir, "admin")),
                         extra_args=["--aclfile", str(acl_dir / "users.acl")])
    server.start()
    try:
        yield server
    finally:
        server.close()


def client_as(server: SecureRedis, user: str, password: str) -> redis.Redis:
    """A client built exactly as the services build theirs (what redis-py sends on connect)."""
    return connect(server.url_for(user, password))


# --- the checks of each user, shared by the make-acl and the compose servers --------------------

def refused(action: Callable[[], object]) -> bool:
    try:
        action()
    except redis.exceptions.NoPermissionError:
        return True
    except redis.ResponseError as exc:  # from inside a script: the NOPERM is in the text
        text = str(exc)
        return "no permissions" in text or "can't access at least one of the keys" in text
    return False


def check_capture_user(client: redis.Redis, own: list[str], other: str) -> None:
    assert client.ping()  # the connect handshake (CLIENT SETINFO refused) raised nothing
    for device in own:
        stream = KEYS.audio(device)
        client.xadd(stream, {"run": "r", "seq": 0, "ts": 1}, maxlen=1200, approximate=True)
        assert client.xrevrange(stream, count=1)
        assert client.hset(KEYS.devices, device, "{}") in (0, 1)
    stream = KEYS.audio(own[0])
    denied: dict[str, Callable[[], object]] = {
        "XADD another device's stream": lambda: client.xadd(KEYS.audio(other), {"a": 1}),
        "read another device's stream": lambda: client.xrange(KEYS.audio(other)),
        "read turns": lambda: client.xrange(KEYS.turns),
        "write turns": lambda: client.xadd(KEYS.turns, {"a": 1}),
        "read the registry": lambda: client.hgetall(KEYS.devices),
        "read a registry field": lambda: client.hget(KEYS.devices, own[0]),
        "delete a registry field": lambda: client.hdel(KEYS.devices, other),
        "XADD to the registry key": lambda: client.xadd(KEYS.devices, {"a": 1}),
        "HSET on its stream key": lambda: client.hset(stream, "a", 1),
        "delete its stream": lambda: client.delete(stream),
        "trim its stream": lambda: client.xtrim(stream, maxlen=0),
        "consume as a group": lambda: client.xgroup_create(stream, "g", id="0"),
        "FLUSHALL": client.flushall,
        "CONFIG": lambda: client.config_get("requirepass"),
        "KEYS": lambda: client.keys("*"),
        "run Lua": lambda: client.eval("return 1", 0),
        "a lease": lambda: client.set(f"{NS}lease:{{{own[0]}}}", "x"),
    }
    allowed = [what for what, action in denied.items() if not refused(action)]
    assert not allowed, f"the capture user may {allowed}"
    # Documented limitation: Redis cannot restrict hash fields, so it can write others' fields.
    assert client.hset(KEYS.devices, other, "{}") in (0, 1)


def check_transcriber_user(client: redis.Redis, capture: redis.Redis, device: str) -> None:
    """Every command the transcriber sends, through its own classes, then what it must not do."""
    from transcriber.budget import SessionBudget
    from transcriber.lease import Leases

    stream, group = KEYS.audio(device), "transcribers"
    assert client.ping()
    added = [capture.xadd(stream, {"run": "r", "seq": seq, "ts": 1}) for seq in range(3)]
    capture.hset(KEYS.devices, device, "{}")
    assert device.encode() in client.hgetall(KEYS.devices)
    client.xgroup_create(stream, group, id="0", mkstream=True)
    client.xgroup_create(KEYS.audio("new-device"), group, id="0", mkstream=True)
    reply: Any = client.xreadgroup(group, "w1", {stream: ">"}, count=10)
    ids = [entry_id for entry_id, _fields in reply[0][1]]
    assert ids[-3:] == added
    claimed: Any = client.xautoclaim(stream, group, "w2", min_idle_time=0, start_id="0-0",
                                     count=1000)
    assert [entry_id for entry_id, _fields in claimed[1]] == ids
    pipe = client.pipeline(transaction=True)
    pipe.xadd(KEYS.turns, {"id": "s:0", "text": "x"}, maxlen=100_000, approximate=True)
    pipe.xadd(KEYS.sessions, {"device": device}, maxlen=100_000, approximate=True)
    pipe.xack(stream, group, *ids)
    assert pipe.execute()[2] == len(ids)

    leases = Leases(client, KEYS, "w1", ttl_s=10)
    lease = leases.acquire(device)
    assert lease is not None
    assert leases.acquire(device) is None
    # A fresh server has no scripts: EVALSHA fails, then SCRIPT LOAD and EVALSHA again.
    assert leases.renew(lease)
    leases.release(lease)
    assert not client.exists(leases.lease_key(device))
    budget = SessionBudget(client, f"{NS}session_budget", per_minute=1)
    assert budget.try_acquire(device)
    assert not budget.try_acquire(device)
    assert budget.retry_after() > 0
    assert client.eval("return redis.call('GET', KEYS[1])", 1, leases.fence_key(device)) == b"1"

    denied: dict[str, Callable[[], object]] = {
        "write audio": lambda: client.xadd(stream, {"a": 1}),
        "write audio from Lua": lambda: client.eval(
            "return redis.call('XADD', KEYS[1], '*', 'a', 1)", 1, stream),
        "delete audio": lambda: client.delete(stream),
        "write the registry": lambda: client.hset(KEYS.devices, device, "{}"),
        "read turns": lambda: client.xrange(KEYS.turns),
        "delete turns": lambda: client.delete(KEYS.turns),
        "lease ops on turns": lambda: client.set(KEYS.turns, "x"),
        "destroy a group": lambda: client.xgroup_destroy(stream, group),
        "FLUSHALL": client.flushall,
        "CONFIG": lambda: client.config_get("requirepass"),
        "SCRIPT FLUSH": client.script_flush,
        "KEYS": lambda: client.keys("*"),
    }
    allowed = [what for what, action in denied.items() if not refused(action)]
    assert not allowed, f"the transcriber user may {allowed}"


# --- make-acl.py -------------------------------------------------------------------------------

def test_make_acl_writes_hashes_not_passwords(acl_dir: Path) -> None:
    acl = acl_dir / "users.acl"
    text = acl.read_text()
    assert acl.stat().st_mode & 0o777 == 0o600
    passwords = {p.name: p.read_text().strip() for p in (acl_dir / "secrets").iterdir()}
    assert set(passwords) == {"admin", "transcriber", "capture-hall", "capture-kitchen"}
    for name, password in passwords.items():
        assert password not in text, name
    for generated in ("admin", "capture-hall"):
        assert (acl_dir / "secrets" / generated).stat().st_mode & 0o777 == 0o600
    assert len(passwords["admin"]) == 48  # generated: 24 random bytes in hex
    lines = text.splitlines()
    assert lines[0] == "user default reset off"
    assert [line.split()[1] for line in lines] == [
        "default", "admin", "transcriber", "capture-hall", "capture-kitchen"]
    # Same passwords, same file: it can be regenerated when a device is added.
    again = make_acl(acl_dir, "hall", "kitchen")
    assert again.returncode == 0, again.stderr
    assert acl.read_text() == text


@pytest.mark.parametrize(("args", "message"), [
    (["--namespace", "edge*", "kitchen"], "--namespace 'edge*' must match"),
    (["kitchen mic"], "device id 'kitchen mic' must match"),
    (["x" * 65], "must match"),
])
def test_make_acl_refuses_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    result = make_acl(tmp_path, *args)
    assert result.returncode == 2
    assert message in result.stderr.splitlines()[-1]
    assert not (tmp_path / "users.acl").exists()


def test_make_acl_without_generate_names_the_missing_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(MAKE_ACL), "--secrets", str(tmp_path / "none"), "kitchen"],
        capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: password of admin: cannot read {tmp_path / 'none' / 'admin'}: "
        "No such file or directory (--generate creates missing ones)"]


def test_default_user_is_off_and_admin_is_not(acl_server: SecureRedis) -> None:
    anonymous = connect(f"redis://127.0.0.1:{acl_server.port}/0")
    # redis-py 8 opens with HELLO 3, which an unauthenticated connection may not send.
    with pytest.raises(redis.AuthenticationError, match=r"NOAUTH|HELLO must be called"):
        anonymous.ping()
    with pytest.raises(redis.AuthenticationError, match="invalid username-password"):
        client_as(acl_server, "capture-kitchen", "wrong-password").ping()
    admin = acl_server.client()
    assert admin.config_get("port") == {"port": str(acl_server.port)}
    anonymous.close()
    admin.close()


# --- capture as its ACL user -------------------------------------------------------------------

def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k in keep}
    (tmp / "xdg").mkdir(exist_ok=True)
    env.update(HOME=str(tmp), XDG_RUNTIME_DIR=str(tmp / "xdg"), METRICS_PORT="0")
    return {**env, **extra}


def run_capture(tmp: Path, wav: Path, url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "capture", "--file", str(wav), "--no-realtime"],
        env=clean_env(tmp, REDIS_URL=url, DEVICE_ID="kitchen", **env),
        capture_output=True, text=True, timeout=60, check=False)


def noise_wav(tmp: Path, seconds: float = 1.0) -> Path:
    samples = np.random.default_rng(7).normal(0, 2000, round(16000 * seconds))
    return write_wav(tmp / "noise.wav", samples.astype("<i2"))


def assert_published(admin: redis.Redis, frames: int) -> None:
    entries: Any = admin.xrange(KEYS.audio("kitchen"))
    decoded = [decode_entry(fields) for _id, fields in entries]
    assert len(decoded) == frames + 1, len(decoded)  # + the end-of-stream entry
    assert [e.seq for e in decoded] == list(range(frames + 1))
    record = DeviceRecord.from_json(admin.hget(KEYS.devices, "kitchen") or b"")
    assert record.run == decoded[0].run


def test_capture_publishes_as_its_acl_user(acl_server: SecureRedis, tmp_path: Path) -> None:
    url = acl_server.url_for("capture-kitchen", REDIS_PW)
    result = run_capture(tmp_path, noise_wav(tmp_path), url)
    assert result.returncode == 0, result.stderr
    assert " WARNING " not in result.stderr and " ERROR " not in result.stderr, result.stderr
    assert_published(acl_server.client(), frames=20)


def test_capture_user_is_refused_everything_else(acl_server: SecureRedis) -> None:
    check_capture_user(client_as(acl_server, "capture-kitchen", REDIS_PW), ["kitchen"], "hall")


def test_transcriber_user_can_do_its_job_and_no_more(acl_server: SecureRedis,
                                                     acl_dir: Path) -> None:
    check_transcriber_user(client_as(acl_server, "transcriber", f"{REDIS_PW}-transcriber"),
                           client_as(acl_server, "capture-hall", secret(acl_dir, "capture-hall")),
                           "hall")


def test_transcriber_worker_runs_as_its_acl_user(acl_server: SecureRedis,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The real worker adopts a device, reads and acknowledges its frames, lets it go."""
    from prometheus_client import CollectorRegistry

    from capture.contract import AudioFrame
    from transcriber.config import TranscriberSettings
    from transcriber.metrics import TranscriberMetrics
    from transcriber.worker import Worker

    url = acl_server.url_for("transcriber", f"{REDIS_PW}-transcriber")
    settings = TranscriberSettings.from_env({"REDIS_URL": url, "ASSEMBLYAI_API_KEY": API_KEY,
                                             "METRICS_PORT": "0"})
    capture = client_as(acl_server, "capture-kitchen", REDIS_PW)
    now = time.time()
    record = DeviceRecord(run="r1", rate=16000, channels=1, started=now, seen=now, source="test")
    capture.hset(KEYS.devices, "kitchen", record.to_json())
    frames = 60  # three seconds of silence: no session is wanted
    for seq in range(frames):
        frame = AudioFrame("r1", seq, int(now * 1e6) + seq * 50_000, bytes(1600))
        capture.xadd(KEYS.audio("kitchen"), frame.to_fields())  # type: ignore[arg-type]

    def no_session() -> Any:
        raise AssertionError("silence must not open a session")

    worker = Worker(settings, client=connect(settings.redis_url),
                    metrics=TranscriberMetrics.create(CollectorRegistry()),
                    open_session=no_session)
    admin = acl_server.client()
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            groups = admin.xinfo_groups(KEYS.audio("kitchen"))
            # Idle, it keeps only a pre-roll (~0.9 s) unacknowledged: the rest is ACKed.
            if groups and groups[0]["entries-read"] == frames and groups[0]["pending"] <= 30:
                break
            assert time.monotonic() < deadline, f"frames not read and acknowledged: {groups}"
            time.sleep(0.05)
        assert worker.devices() == ["kitchen"]
        assert admin.exists(f"{NS}lease:{{kitchen}}")
    finally:
        worker.stop()
    assert not admin.exists(f"{NS}lease:{{kitchen}}")  # released by the release script
    problems = [r.getMessage() for r in caplog.records if r.levelno >= 30]
    assert not problems, problems


# --- the same users, created by docker-compose.yml's Redis command -------------------------------

def render_compose(tmp: Path, env_text: str) -> dict[str, Any]:
    (tmp / "secrets").mkdir(exist_ok=True)
    (tmp / "secrets" / "assemblyai_api_key").write_text(API_KEY)
    env_file = tmp / "test.env"
    env_file.write_text(f"{env_text}\nSECRETS_DIR={tmp / 'secrets'}\n")
    candidate = Path(sys.executable).parent / "docker-compose"
    binary = str(candidate) if candidate.is_file() else require_tool("docker-compose")
    result = subprocess.run(
        [binary, "-f", str(ROOT / "docker-compose.yml"), "--env-file", str(env_file),
         "--profile", "replay", "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp),
             "DOCKER_CONFIG": str(tmp / "docker")})
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


class ComposeRedis(SecureRedis):
    """redis-server started by the compose file's own command (a stand-in image entrypoint)."""

    def __init__(self, binary: str, service: dict[str, Any], tmp: Path) -> None:
        super().__init__(binary, admin=(None, service["environment"]["REDIS_PASSWORD"]),
                         extra_args=[])
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        entrypoint = bin_dir / "docker-entrypoint.sh"
        entrypoint.write_text('#!/bin/sh\nshift\nexec "$REDIS_SERVER" --port "$PORT" '
                              '--bind 127.0.0.1 --save "" --dir "$DIR" "$@"\n')
        entrypoint.chmod(0o755)
        self._command = [part.replace("$$", "$") for part in service["command"]]
        self._env = {**service["environment"], "PATH": f"{bin_dir}:/usr/bin:/bin",
                     "REDIS_SERVER": binary, "PORT": str(self.port), "DIR": str(tmp)}
        self._child: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        self._child = subprocess.Popen(self._command, env=self._env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        with self.client() as probe:
            while True:
                try:
                    probe.ping()
                except redis.ConnectionError:
                    assert self._child.poll() is None, "redis-server exited"
                    assert time.monotonic() < deadline, "redis-server did not start"
                    time.sleep(0.02)
                else:
                    return

    def stop(self) -> None:
        if self._child is not None:
            self._child.terminate()
            self._child.wait(10)
            self._child = None


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def acl_user(client: redis.Redis, user: str) -> dict[str, Any]:
    """ACL GETUSER without the password, rules as sets (Redis does not keep their order)."""
    raw: Any = client.acl_getuser(user)

    def rules(pairs: dict[Any, Any]) -> dict[str, frozenset[str]]:
        return {text(k): frozenset(text(v).split() if isinstance(v, str | bytes)
                                   else (text(i) for i in v))
                for k, v in pairs.items()
                if text(k) in ("categories", "commands", "keys", "channels", "flags")}

    selectors = [rules(dict(zip(s[::2], s[1::2], strict=True))) for s in raw["selectors"]]
    return {**rules(raw), "selectors": sorted(selectors, key=lambda r: sorted(r["keys"]))}


def test_compose_creates_the_same_users(tmp_path: Path) -> None:
    binary = require_tool("redis-server")
    capture_pw, transcriber_pw = "compose-capture-pw-1", "compose-transcriber-pw-1"
    config = render_compose(tmp_path, "\n".join([
        "REDIS_PASSWORD=compose-admin-pw-1", "GRAFANA_ADMIN_PASSWORD=g",
        f"REDIS_CAPTURE_PASSWORD={capture_pw}",
        "CAPTURE_REDIS_URL=redis://capture:${REDIS_CAPTURE_PASSWORD}@redis:6379/0",
        f"REDIS_TRANSCRIBER_PASSWORD={transcriber_pw}",
        "TRANSCRIBER_REDIS_URL=redis://transcriber:${REDIS_TRANSCRIBER_PASSWORD}@redis:6379/0",
        "DEVICE_ID=kitchen"]))
    services = config["services"]
    for name, user, password in (("capture", "capture", capture_pw),
                                 ("capture-replay", "capture", capture_pw),
                                 ("transcriber", "transcriber", transcriber_pw)):
        assert services[name]["environment"]["REDIS_URL"] == (
            f"redis://{user}:{password}@redis:6379/0"), name
    compose_redis = ComposeRedis(binary, services["redis"], tmp_path)
    acl_tmp = tmp_path / "acl"
    acl_tmp.mkdir()
    assert make_acl(acl_tmp, "kitchen", "replay").returncode == 0
    reference = SecureRedis(binary, admin=("admin", secret(acl_tmp, "admin")),
                            extra_args=["--aclfile", str(acl_tmp / "users.acl")])
    compose_redis.start()
    reference.start()
    try:
        admin, ref = compose_redis.client(), reference.client()
        assert acl_user(admin, "transcriber") == acl_user(ref, "transcriber")
        capture_user, kitchen, replay = (acl_user(admin, "capture"),
                                         acl_user(ref, "capture-kitchen"),
                                         acl_user(ref, "capture-replay"))
        assert capture_user["keys"] == kitchen["keys"] | replay["keys"]
        assert {**capture_user, "keys": None} == {**kitchen, "keys": None}
        check_capture_user(client_as(compose_redis, "capture", capture_pw),
                           ["kitchen", "replay"], "hall")
        check_transcriber_user(client_as(compose_redis, "transcriber", transcriber_pw),
                               client_as(compose_redis, "capture", capture_pw), "replay")
    finally:
        compose_redis.close()
        reference.close()


def test_compose_without_service_passwords_adds_no_user(tmp_path: Path) -> None:
    config = render_compose(tmp_path, "REDIS_PASSWORD=compose-admin-pw-2\n"
                                      "GRAFANA_ADMIN_PASSWORD=g")
    server = ComposeRedis(require_tool("redis-server"), config["services"]["redis"], tmp_path)
    server.start()
    try:
        assert [text(u) for u in server.client().acl_users()] == ["default"]
    finally:
        server.close()


# --- TLS -----------------------------------------------------------------------------------------

@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path / "tls", require_tool("openssl"))


@pytest.fixture
def tls_server(request: pytest.FixtureRequest, acl_dir: Path,
               tls_files: TlsFiles) -> Iterator[SecureRedis]:
    """TLS only (the plain port is closed), ACL users; indirect param: tls-auth-clients."""
    auth_clients: str | None = getattr(request, "param", None)
    port = free_port()
    # deploy/redis/redis-tls.conf as options, its example paths pointing at this test's files
    # (acl_dir/users.acl and acl_dir/tls/*, laid out like /etc/redis/).
    assert tls_files.ca_cert.parent == acl_dir / "tls"
    options = []
    for line in (ROOT / "deploy" / "redis" / "redis-tls.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, *values = line.replace("/etc/redis/", f"{acl_dir}/").split()
            options += [f"--{name}", *values]
    server = SecureRedis(
        require_tool("redis-server"), admin=("admin", secret(acl_dir, "admin")), port=port,
        tls=tls_files, extra_args=[*options, "--tls-port", str(port), *(
            ["--tls-auth-clients", auth_clients] if auth_clients else [])])
    server.start()
    try:
        yield server
    finally:
        server.close()


def test_redis_url_takes_tls_options(tls_files: TlsFiles) -> None:
    url = (f"rediss://capture-kitchen:{REDIS_PW}@redis.example:6380/0"
           f"?ssl_ca_certs={tls_files.ca_cert}&ssl_cert_reqs=required")
    assert validate_redis_url(url) == url
    kwargs = redis.connection.parse_url(url)
    assert kwargs["connection_class"] is redis.SSLConnection
    assert kwargs["ssl_ca_certs"] == str(tls_files.ca_cert)
    assert redact_url(url) == url.replace(REDIS_PW, "***")
    connection: Any = redis.ConnectionPool.from_url(url).make_connection()  # no I/O yet
    assert (connection.ca_certs, connection.check_hostname) == (str(tls_files.ca_cert), True)


def test_capture_publishes_over_tls(tls_server: SecureRedis, tmp_path: Path) -> None:
    url = tls_server.url_for("capture-kitchen", REDIS_PW)
    assert url.startswith("rediss://") and "ssl_ca_certs=" in url
    result = run_capture(tmp_path, noise_wav(tmp_path), url)
    assert result.returncode == 0, result.stderr
    assert_published(tls_server.client(), frames=20)


@pytest.mark.parametrize("tls_server", ["yes"], indirect=True)
def test_capture_over_mutual_tls(tls_server: SecureRedis, tls_files: TlsFiles,
                                 tmp_path: Path) -> None:
    with_cert = tls_server.url_for("capture-kitchen", REDIS_PW, query={
        "ssl_ca_certs": tls_files.ca_cert, "ssl_certfile": tls_files.client_cert,
        "ssl_keyfile": tls_files.client_key})
    result = run_capture(tmp_path, noise_wav(tmp_path), with_cert)
    assert result.returncode == 0, result.stderr
    assert_published(tls_server.client(), frames=20)
    without = run_capture(tmp_path, noise_wav(tmp_path), tls_server.url_for(
        "capture-kitchen", REDIS_PW), CAPTURE_FLUSH_TIMEOUT_S="1")
    assert_fails_in_log_lines(without, "ConnectionError")


def assert_fails_in_log_lines(result: subprocess.CompletedProcess[str], expected: str) -> None:
    """Status 1, the reason in a one-line warning, and no traceback: every line is a log line."""
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(re.match(LOG_LINE, line) for line in lines), result.stderr
    assert any(" WARNING " in line and expected in line for line in lines), result.stderr
    assert "could not write the end-of-stream entry" in lines[-2]


@pytest.mark.parametrize(("scheme", "query", "expected"), [
    ("redis", {}, "ConnectionError"),  # a plain client on the TLS port: reset by the server
    ("rediss", {}, "CERTIFICATE_VERIFY_FAILED"),  # the system CAs do not know ours
])
def test_a_wrong_tls_setting_fails_in_one_line(tls_server: SecureRedis, tmp_path: Path,
                                               scheme: str, query: dict[str, Path],
                                               expected: str) -> None:
    url = tls_server.url_for("capture-kitchen", REDIS_PW, scheme=scheme, query=query)
    result = run_capture(tmp_path, noise_wav(tmp_path), url, CAPTURE_FLUSH_TIMEOUT_S="1")
    assert_fails_in_log_lines(result, expected)
    assert REDIS_PW not in result.stdout + result.stderr


def test_a_tls_option_on_a_plain_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ssl_ca_certs"):
        validate_redis_url("redis://127.0.0.1:6379/0?ssl_ca_certs=/etc/ca.pem")


# --- no secret in process arguments, metrics, health, logs or reprs -----------------------------

SECRETS = (REDIS_PW, API_KEY)


def assert_no_secret(text: str, where: str) -> None:
    for value in SECRETS:
        assert value not in text, f"{value!r} in {where}: {text[-2000:]}"


def get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
            return str(response.read().decode())
    except urllib.error.HTTPError as exc:  # /healthz answers 503 while unhealthy
        return str(exc.read().decode())


def wait_for_http(url: str, process: subprocess.Popen[str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            get(url)
        except (urllib.error.URLError, OSError):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"{url} never answered"
            time.sleep(0.05)
        else:
            return


def inspect_running(process: subprocess.Popen[str], port: int) -> None:
    """What any local user or a scraper can see of a running service."""
    cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode(errors="replace")
    assert_no_secret(cmdline, "/proc/PID/cmdline")
    for path in ("/metrics", "/healthz", "/nothing-here"):
        assert_no_secret(get(f"http://127.0.0.1:{port}{path}"), path)


def test_capture_leaks_no_secret(acl_server: SecureRedis, tmp_path: Path) -> None:
    wav = noise_wav(tmp_path, seconds=2.0)
    port = free_port()
    env = clean_env(tmp_path, REDIS_URL=acl_server.url_for("capture-kitchen", REDIS_PW),
                    DEVICE_ID="kitchen", METRICS_PORT=str(port), LOG_LEVEL="DEBUG")
    process = subprocess.Popen([sys.executable, "-m", "capture", "--file", str(wav)],  # real time
                               env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", process)
        inspect_running(process, port)
        assert 'capture_frames_published_total{device="kitchen"}' in get(
            f"http://127.0.0.1:{port}/metrics")
    finally:
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert_no_secret(out + err, "the output")
    assert " DEBUG " in err  # the level that would show the most did run
    assert_published(acl_server.client(), frames=40)
    # The failure path too: a refused password is logged, the password is not.
    refused_run = run_capture(tmp_path, wav, acl_server.url_for("capture-kitchen",
                                                                f"{REDIS_PW}-wrong"),
                              LOG_LEVEL="DEBUG", CAPTURE_FLUSH_TIMEOUT_S="1")
    assert_fails_in_log_lines(refused_run, "AuthenticationError")
    assert_no_secret(refused_run.stdout + refused_run.stderr, "the output of a refused login")


class AuthRejectingServer:
    """A websocket endpoint that records the Authorization header, then closes with 1008 and,
    like a careless proxy, echoes the key in the close reason."""

    def __init__(self) -> None:
        from websockets.sync.server import ServerConnection, serve

        self.keys: list[str | None] = []
        self.connected = threading.Event()

        def handler(ws: ServerConnection) -> None:
            assert ws.request is not None
            self.keys.append(ws.request.headers.get("Authorization"))
            self.connected.set()
            ws.close(1008, f"Invalid API key {ws.request.headers.get('Authorization')}")

        self._server = serve(handler, "127.0.0.1", 0)
        self.port = int(self._server.socket.getsockname()[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="ws-stub",
                                        daemon=True)

    def __enter__(self) -> AuthRejectingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._thread.join(5)


def test_transcriber_leaks_no_secret(acl_server: SecureRedis, tmp_path: Path) -> None:
    speech = write_wav(tmp_path / "speech.wav", compose(0.5, "zero one two three four", 1.0))
    port = free_port()
    with AuthRejectingServer() as stub:
        env = clean_env(
            tmp_path, REDIS_URL=acl_server.url_for("transcriber", f"{REDIS_PW}-transcriber"),
            ASSEMBLYAI_API_KEY=API_KEY, ASSEMBLYAI_URL=f"ws://127.0.0.1:{stub.port}/v3/ws",
            METRICS_PORT=str(port), LOG_LEVEL="DEBUG")
        process = subprocess.Popen([sys.executable, "-m", "transcriber"], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/healthz", process)
            published = run_capture(tmp_path, speech, acl_server.url_for("capture-kitchen",
                                                                          REDIS_PW))
            assert published.returncode == 0, published.stderr
            assert stub.connected.wait(20), "the transcriber never opened a session"
            deadline = time.monotonic() + 10
            while 'code="1008"' not in get(f"http://127.0.0.1:{port}/metrics"):
                assert time.monotonic() < deadline, "the 1008 close was never counted"
                time.sleep(0.05)
            inspect_running(process, port)
        finally:
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=30)
    assert stub.keys == [API_KEY]  # the key went where it belongs, and only there
    assert process.returncode == 0, err
    assert "1008" in err  # the rejection was logged ...
    assert_no_secret(out + err, "the output")  # ... without the key it echoed


def test_reprs_hold_no_secret(tmp_path: Path) -> None:
    from transcriber.config import TranscriberSettings

    url = f"rediss://capture-kitchen:{REDIS_PW}@127.0.0.1:6380/0?ssl_ca_certs=/ca.pem"
    capture_settings = CaptureSettings.from_env({"REDIS_URL": url, "DEVICE_ID": "kitchen"})
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY + "\n")
    from_file = TranscriberSettings.from_env({"REDIS_URL": url,
                                              "ASSEMBLYAI_API_KEY_FILE": str(key_file)})
    from_env = TranscriberSettings.from_env({"REDIS_URL": url, "ASSEMBLYAI_API_KEY": API_KEY})
    assert from_file.api_key == from_env.api_key == API_KEY
    client = connect(url)
    for name, thing in (("CaptureSettings", capture_settings), ("from a key file", from_file),
                        ("TranscriberSettings", from_env), ("redis client", client),
                        ("connection pool", client.connection_pool),
                        ("connection", client.connection_pool.make_connection())):
        assert_no_secret(repr(thing), f"repr of {name}")
        assert_no_secret(str(thing), f"str of {name}")
    assert capture_settings.redis_url_safe == url.replace(REDIS_PW, "***")
    assert from_env.redis_url_redacted == url.replace(REDIS_PW, "***")
