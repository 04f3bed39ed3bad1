"""The compose stack on this host: services started from the rendered compose file, Prometheus.

``docker compose config`` gives each service's command and environment; :func:`host_service`
turns one into a process started here, changing only what cannot be the same outside a
container (host names, mounted paths, secrets, ports) and saying what it changed.
:class:`ServiceProcess` runs it under compose's restart policy. :class:`Prometheus` runs the
Debian ``prometheus`` with a config derived from deploy/prometheus/prometheus.yml.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capture.common.redisconn import redact_url
from tests.support.procs import stop_process

# Console scripts and interpreters of the images, as this venv runs them.
HOST_COMMANDS = {
    "python": [sys.executable],
    "python3": [sys.executable],
    "edgescribe-capture": [sys.executable, "-m", "capture"],
    "edgescribe-transcriber": [sys.executable, "-m", "transcriber"],
}
RESTARTING = {"always", "unless-stopped"}  # compose restart policies that restart a clean exit
STOP_GRACE_CAP_S = 15.0  # compose waits up to stop_grace_period; a test waits at most this


# --- from the compose file to a host process ---------------------------------------------------

def dockerfile_entrypoint(dockerfile: Path, target: str) -> list[str]:
    """The exec-form ENTRYPOINT of stage ``target``, inherited through ``FROM <stage>``."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    parent: dict[str, str] = {}
    entrypoint: dict[str, list[str]] = {}
    stage = ""
    for line in text.splitlines():
        match = re.match(r"FROM (\S+) AS (\S+)$", line.strip())
        if match:
            stage = match.group(2)
            parent[stage] = match.group(1)
        elif line.startswith("ENTRYPOINT "):
            entrypoint[stage] = list(json.loads(line.removeprefix("ENTRYPOINT ")))
    while target not in entrypoint:
        if target not in parent:
            raise ValueError(f"{dockerfile}: no exec-form ENTRYPOINT for stage {target!r}")
        target = parent[target]
    return entrypoint[target]


@dataclass(frozen=True)
class HostService:
    """One compose service as a host process: argv and environment, plus what was changed."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(repr=False)
    restart: str
    stop_grace_s: float
    substituted: list[str]


def host_service(config: Mapping[str, Any], name: str, dockerfile: Path, *, redis_port: int,
                 metrics_port: int, aai_url: str | None = None,
                 paths: Mapping[str, Path] | None = None) -> HostService:
    """Service ``name`` of a rendered compose ``config`` (``config --format json``), started the
    way compose starts it: the Dockerfile's ENTRYPOINT (or the service's ``entrypoint``) plus
    ``command``, with the service's ``environment``. Changed, and only these:

    - ``REDIS_URL``: the host ``redis`` (compose's service) -> ``127.0.0.1:redis_port``;
      user, password and database stay;
    - ``ASSEMBLYAI_URL`` -> ``aai_url``;
    - a value naming a secret's mount point (``/run/secrets/...``) -> the secret's own file;
    - ``METRICS_PORT`` -> ``metrics_port``;
    - each container path in ``paths`` (an argument or a variable) -> its host path.
    """
    service = config["services"][name]
    build = service.get("build") or {}
    entrypoint = service.get("entrypoint") or dockerfile_entrypoint(dockerfile, build["target"])
    argv = [*entrypoint, *(service.get("command") or [])]
    if argv[0] not in HOST_COMMANDS:
        raise ValueError(f"{name}: no host equivalent of {argv[0]!r}")
    env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
    changes: list[str] = []

    def change(what: str, old: str, new: str, shown_old: str | None = None,
               shown_new: str | None = None) -> str:
        changes.append(f"{name}: {what}: {shown_old or old} -> {shown_new or new}")
        return new

    argv = [*HOST_COMMANDS[argv[0]], *argv[1:]]
    changes.append(f"{name}: argv[0]: {entrypoint[0]} -> {' '.join(HOST_COMMANDS[entrypoint[0]])}")

    new_url = _on_host(env["REDIS_URL"], redis_port, name)
    env["REDIS_URL"] = change("REDIS_URL", env["REDIS_URL"], new_url,
                              redact_url(env["REDIS_URL"]), redact_url(new_url))

    if "ASSEMBLYAI_URL" in env:
        if aai_url is None:
            raise ValueError(f"{name} talks to AssemblyAI: give aai_url")
        env["ASSEMBLYAI_URL"] = change("ASSEMBLYAI_URL", env["ASSEMBLYAI_URL"], aai_url)

    for mount in service.get("secrets") or []:
        source = config["secrets"][mount["source"]]["file"]
        for key, value in env.items():
            if value == mount["target"]:
                env[key] = change(f"{key} (secret {mount['source']})", value, source)

    env["METRICS_PORT"] = change("METRICS_PORT", env["METRICS_PORT"], str(metrics_port))

    for container_path, host_path in (paths or {}).items():
        places = [i for i, arg in enumerate(argv) if arg == container_path]
        for i in places:
            argv[i] = change(f"argument {i}", container_path, str(host_path))
        variables = [key for key, value in env.items() if value == container_path]
        for key in variables:
            env[key] = change(key, container_path, str(host_path))
        if not places and not variables:
            raise ValueError(f"{name}: {container_path} appears in no argument or variable")

    grace = service.get("stop_grace_period")
    return HostService(name=name, argv=argv, env=env,
                       restart=str(service.get("restart", "no")),
                       stop_grace_s=_seconds(grace) if grace else 10.0, substituted=changes)


def _on_host(redis_url: str, port: int, service: str) -> str:
    """``redis_url`` with compose's host ``redis`` replaced by 127.0.0.1:``port``."""
    url = urllib.parse.urlsplit(redis_url)
    if url.hostname != "redis":
        raise ValueError(f"{service}: REDIS_URL points at {url.hostname!r}, not the redis service")
    userinfo = url.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urllib.parse.urlunsplit(url._replace(netloc=netloc))


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    if match is None:
        raise ValueError(f"cannot read the duration {duration!r}")
    return float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match.group(2)]


class ServiceProcess:
    """A :class:`HostService` as a child process, restarted as compose's ``restart`` says.

    The environment is the service's alone (plus PATH and HOME), as in its container: nothing
    leaks in from the developer's shell. Output goes to ``<log_dir>/<name>.log``.
    """

    def __init__(self, service: HostService, log_dir: Path) -> None:
        self.service = service
        self.log_path = log_dir / f"{service.name}.log"
        self._home = log_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self.exit_codes: list[int] = []
        self._stopping = False

    def start(self) -> None:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self._home),
               "PYTHONUNBUFFERED": "1", **self.service.env}
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(self.service.argv, env=env, cwd=self._home,
                                          stdout=log, stderr=subprocess.STDOUT)

    @property
    def restarts(self) -> int:
        return len(self.exit_codes)

    def supervise(self) -> None:
        """Call often: record an exit and restart the process if its policy says so."""
        if self._stopping or self._proc is None or self._proc.poll() is None:
            return
        self.exit_codes.append(self._proc.returncode)
        self._proc = None
        if self.service.restart in RESTARTING or (
                self.service.restart == "on-failure" and self.exit_codes[-1] != 0):
            self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after the grace period (capped); the exit status."""
        self._stopping = True
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(min(self.service.stop_grace_s, STOP_GRACE_CAP_S))
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return f"--- {self.service.name}: no log"
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join([f"--- {self.service.name} ({self.log_path})", *tail])


# --- Prometheus ------------------------------------------------------------------------------

def derive_prometheus_config(text: str, *, targets: Mapping[str, list[str]], rules_dir: Path,
                             interval: str = "1s") -> str:
    """deploy/prometheus/prometheus.yml with static ``targets`` per job instead of its service
    discovery, every interval set to ``interval``, and rule files as absolute paths. Every other
    line (job names, labels, relabelling) stays as it is. Line-based (no YAML library in the
    test extra), as the file is plain block YAML; Prometheus refuses a config it cannot load."""
    out: list[str] = []
    job: str | None = None
    in_rule_files = False
    skip_deeper_than: int | None = None
    replaced: set[str] = set()
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None:
            if not line.strip() or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        stripped = line.strip()
        if re.match(r"(scrape|evaluation)_interval:", stripped):
            key = stripped.split(":", 1)[0]
            out.append(f"{' ' * indent}{key}: {interval}")
            continue
        if stripped == "rule_files:":
            in_rule_files = True
        elif in_rule_files and stripped.startswith("- "):
            name = stripped[2:].strip().strip("\"'")
            path = name if name.startswith("/") else str(rules_dir / name)
            out.append(f"{' ' * indent}- {json.dumps(path)}")
            continue
        elif stripped and not stripped.startswith("#") and indent == 0:
            in_rule_files = False
        match = re.match(r"- job_name: ['\"]?([\w-]+)", stripped)
        if match:
            job = match.group(1)
        if re.fullmatch(r"(static|dns_sd|file_sd|kubernetes_sd|consul_sd)_configs:", stripped):
            if job is None or job not in targets:
                raise ValueError(f"no targets given for the scrape job {job!r}")
            out.append(f"{' ' * indent}static_configs:")
            out.append(f"{' ' * indent}  - targets: {json.dumps(targets[job])}")
            replaced.add(job)
            skip_deeper_than = indent
            continue
        out.append(line)
    if replaced != set(targets):
        raise ValueError(f"jobs not found in the config: {sorted(set(targets) - replaced)}")
    return "\n".join(out) + "\n"


class Prometheus:
    """``prometheus`` as a plain child process on 127.0.0.1, with its HTTP API."""

    def __init__(self, binary: str, config: Path, data_dir: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = data_dir.parent / "prometheus.log"
        self._argv = [binary, f"--config.file={config}", f"--storage.tsdb.path={data_dir}",
                      f"--web.listen-address=127.0.0.1:{port}"]
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(self._argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not become ready:\n{self.log_tail()}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            url = f"{self.url}/-/ready"
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - http, loopback
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params: str) -> Any:
        """The ``data`` of a successful /api/v1 answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"{self.url}/api/v1/{path}{query}"
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - http, loopback
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's series (a scalar answer counts as one series)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def value(self, expr: str) -> float | None:
        """The value of a one-series query, or None when it returns nothing."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        stop_process(self._proc, 10)
        self._proc = None

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return "--- prometheus: no log"
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(["--- prometheus", *tail])


def alert_groups(alerts_yml: str) -> dict[str, list[str]]:
    """Group name -> its alert names, from a rules file in block style."""
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in alerts_yml.splitlines():
        group = re.match(r"^\s+- name: (\S+)\s*$", line)
        if group:
            current = groups.setdefault(group.group(1), [])
            continue
        alert = re.match(r"^\s+- alert: (\w+)\s*$", line)
        if alert and current is not None:
            current.append(alert.group(1))
    return groups


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Grafana's variables in a query; longest names first (``$__rate_interval`` before
    ``$__range``...), and a leftover ``$`` is an error."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(name, variables[name])
    if "$" in expr:
        raise ValueError(f"unknown Grafana variable in {expr}")
    return expr
