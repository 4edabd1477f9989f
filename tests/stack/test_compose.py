"""stack/compose.yaml (for users with Docker) uses only the settings of stack/stack.env and the
secrets' names, and publishes each service on the port its setting names."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from stack.settings import SECRET_NAMES, SETTINGS_FILE, parse_env_file

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "stack" / "compose.yaml"
# ${VAR}, ${VAR:-default}, ${VAR?err}; $${...} is an escape for the container's shell
_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")
PUBLISHED = {
    "postgres": "POSTGRES_PORT",
    "seaweedfs": "S3_PORT",
    "mlflow": "MLFLOW_PORT",
    "prefect": "PREFECT_PORT",
}


def test_every_variable_is_a_setting_or_a_secret() -> None:
    known = set(parse_env_file(ROOT / SETTINGS_FILE)) | set(SECRET_NAMES)
    used = set(_VAR.findall(COMPOSE.read_text()))
    assert used, "compose.yaml uses no settings"
    assert used <= known, f"not in {SETTINGS_FILE} nor a secret: {sorted(used - known)}"


def test_each_service_is_published_on_its_setting_on_stack_host() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for service, setting in PUBLISHED.items():
        ports = services[service]["ports"]
        assert ports == [f"${{STACK_HOST}}:${{{setting}}}:${{{setting}}}"], (service, ports)
        # the container listens on the same port it is published on
        command = str(services[service].get("command", "")) + str(
            services[service].get("environment", {})
        )
        assert f"${{{setting}}}" in command, (service, setting)


def test_settings_and_secrets_files_are_read() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for service in PUBLISHED:
        files = [entry["path"] for entry in services[service]["env_file"]]
        assert files == ["stack.env", "../.stack/secrets.env"], service
        assert (COMPOSE.parent / files[0]).resolve() == ROOT / SETTINGS_FILE
    assert set(services) >= {*PUBLISHED, "worker"}
