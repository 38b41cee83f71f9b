"""The production stack starts: compose.yaml and the Dockerfile read together.

Services in profiles (observability, ...) are held to the same rules; an image this file does
not know the commands of must be added to IMAGE_COMMANDS before a health check may use it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
ENV_EXAMPLE = (ROOT / ".env.example").read_text()
# commands the images we do not build are known to have (their images' documentation)
IMAGE_COMMANDS = {
    "postgres": {"sh", "bash", "pg_isready", "psql"},
    "vllm/vllm-openai": {"sh", "bash", "python3", "vllm"},
    "prom/prometheus": {"sh", "wget", "promtool"},
    "grafana/grafana": {"sh", "wget", "curl"},
}


class Dockerfile:
    """What the image built from ./Dockerfile has: its user, directories, owners, commands."""

    def __init__(self, text: str) -> None:
        lines = text.replace("\\\n", " ").splitlines()
        self.base = next(ln.split()[1] for ln in lines if ln.startswith("FROM "))
        self.user = [ln.split()[1] for ln in lines if ln.startswith("USER ")][-1]
        runs = [ln[4:] for ln in lines if ln.startswith("RUN ")]
        self.created: set[str] = set()
        self.owned: dict[str, str] = {}
        for run in runs:
            for command in re.split(r"&&|;", run):
                words = shlex.split(command)
                if words[:2] == ["mkdir", "-p"]:
                    self.created.update(words[2:])
                elif words and words[0] == "chown":
                    args = [w for w in words[1:] if not w.startswith("-")]
                    for path in args[1:]:
                        self.owned[path] = args[0].split(":")[0]
        scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
        self.commands = {"sh", "python", "python3", "pip", *scripts} \
            if self.base.startswith("python:") else set(scripts)


IMAGE = Dockerfile((ROOT / "Dockerfile").read_text())
BUILT = {s["image"] for s in SERVICES.values() if "build" in s}  # chatloop's own image


def ours(service: dict[str, Any]) -> bool:
    return service.get("image") in BUILT or "build" in service


def test_every_writable_volume_exists_in_the_image_and_belongs_to_its_user() -> None:
    checked = []
    for name, service in SERVICES.items():
        if not ours(service):
            continue
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            if mode == ["ro"]:
                continue
            assert target in IMAGE.created, f"{name}: {target} is not made in the Dockerfile"
            assert IMAGE.owned.get(target) == IMAGE.user, \
                f"{name}: {target} is not owned by {IMAGE.user} in the image"
            checked.append(target)
    assert {"/models", "/adapters", "/runs"} <= set(checked)


def test_every_variable_compose_reads_is_documented_in_env_example() -> None:
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", (ROOT / "compose.yaml").read_text()))
    assert {"POSTGRES_PASSWORD", "VLLM_API_KEY"} <= used
    missing = [v for v in sorted(used)
               if not re.search(rf"^#?\s*{v}=", ENV_EXAMPLE, re.MULTILINE)]
    assert missing == [], f"add these to .env.example: {missing}"


def test_chatloop_services_read_env_and_no_secret_is_on_a_command_line() -> None:
    for name, service in SERVICES.items():
        if ours(service):
            assert service.get("env_file") in (".env", [".env"]), name
        command = " ".join(service.get("command") or [])
        assert not re.search(r"KEY|PASSWORD|TOKEN|SECRET", command), \
            f"{name}: a secret on the command line (visible in ps and inspect)"
    assert "VLLM_API_KEY" in SERVICES["vllm"]["environment"]


def _health_command(test: list[str] | str) -> list[str]:
    if isinstance(test, str):
        return ["sh", *shlex.split(test)[:1]]
    kind, *rest = test
    return ["sh", shlex.split(rest[0])[0]] if kind == "CMD-SHELL" else rest[:1]


def test_every_health_check_runs_a_command_its_image_has() -> None:
    for name, service in SERVICES.items():
        check = service.get("healthcheck")
        if not check or check.get("disable"):
            continue
        image = service["image"].split("@")[0].rsplit(":", 1)[0]
        have = IMAGE.commands if ours(service) else IMAGE_COMMANDS.get(image)
        assert have is not None, f"{name}: add the commands of {image} to IMAGE_COMMANDS"
        for command in _health_command(check["test"]):
            assert command in have, f"{name}: its health check runs {command}, not in {image}"
    assert SERVICES["trainer"]["healthcheck"]["test"] == ["CMD", "chatloop", "health",
                                                          "trainer"]


def test_every_image_is_pinned() -> None:
    for name, service in SERVICES.items():
        if ours(service):
            continue
        image = service["image"]
        tag = image.split("@")[0].rsplit(":", 1)[1] if ":" in image.split("@")[0] else ""
        assert "@sha256:" in image or re.search(r"\d+\.\d+", tag), \
            f"{name}: {image} is not pinned to a release"


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    """`docker-compose config -q` (Debian's docker-compose; .ci/run installs it) on the
    project with an .env made from .env.example and the two required secrets."""
    binary = shutil.which("docker-compose")
    assert binary, "install Debian's docker-compose (apt-get install -y docker-compose)"
    for entry in ROOT.iterdir():  # compose resolves relative paths next to compose.yaml
        if entry.name not in (".env", ".git"):
            (tmp_path / entry.name).symlink_to(entry)
    settings = [ln for ln in ENV_EXAMPLE.splitlines() if ln and not ln.startswith("#")]
    (tmp_path / ".env").write_text("\n".join([*settings, "POSTGRES_PASSWORD=ci-password",
                                              "VLLM_API_KEY=ci-key"]) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATLOOP_", "VLLM_"))}
    done = subprocess.run([binary, "-f", "compose.yaml", "config", "-q"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (tmp_path / ".env").write_text("\n".join(settings) + "\n")  # no secrets: refused
    done = subprocess.run([binary, "-f", "compose.yaml", "config", "-q"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "POSTGRES_PASSWORD" in done.stderr + done.stdout
