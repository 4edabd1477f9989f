"""stack/settings.py: stack/stack.env < .stack/secrets.env < the environment, checked at load;
secrets generated once, mode 600, and never in a tracked file."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from stack.settings import (
    SECRET_NAMES,
    SECRETS_FILE,
    SETTINGS_FILE,
    StackError,
    ensure_secrets,
    load_settings,
    parse_env_file,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "stack").mkdir()
    shutil.copy(ROOT / SETTINGS_FILE, tmp_path / SETTINGS_FILE)
    return tmp_path


def _set_in_file(repo: Path, key: str, value: str) -> None:
    path = repo / SETTINGS_FILE
    text = re.sub(rf"^{key}=.*$", f"{key}={value}", path.read_text(), flags=re.M)
    path.write_text(text)


def test_environment_wins_over_secrets_which_win_over_the_file(repo: Path) -> None:
    assert load_settings(repo, {}).mlflow_port == 5001
    secrets = repo / ".stack" / SECRETS_FILE
    secrets.parent.mkdir()
    secrets.write_text("MLFLOW_PORT=6001\nPOSTGRES_PASSWORD=from-file\n")
    assert load_settings(repo, {}).mlflow_port == 6001
    settings = load_settings(repo, {"MLFLOW_PORT": "7001"})
    assert settings.mlflow_port == 7001 and settings.postgres_password == "from-file"
    assert load_settings(repo, {"POSTGRES_PASSWORD": "env"}).postgres_password == "env"


def test_a_bad_value_names_the_variable_and_where_it_came_from(repo: Path) -> None:
    with pytest.raises(StackError, match=r"MLFLOW_PORT \(from the environment\)"):
        load_settings(repo, {"MLFLOW_PORT": "99999"})
    _set_in_file(repo, "S3_BUCKET", "Bad_Bucket")
    with pytest.raises(
        StackError, match=rf"S3_BUCKET \(from {re.escape(str(repo / SETTINGS_FILE))}"
    ):
        load_settings(repo, {})


def test_an_unknown_setting_or_a_broken_line_is_refused(repo: Path) -> None:
    path = repo / SETTINGS_FILE
    path.write_text(path.read_text() + "MLFLOW_PROT=5002\n")
    with pytest.raises(StackError, match="unknown setting.*MLFLOW_PROT"):
        load_settings(repo, {})
    path.write_text("just words\n")
    with pytest.raises(StackError, match=r"stack\.env:1: expected KEY=value"):
        load_settings(repo, {})


def test_a_missing_settings_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"stack/stack\.env.*missing"):
        load_settings(tmp_path, {})


def test_secrets_are_generated_once_with_mode_600(repo: Path) -> None:
    path = ensure_secrets(repo, {})
    assert path == repo / ".stack" / SECRETS_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    first = parse_env_file(path)
    assert set(first) == set(SECRET_NAMES) and all(len(v) >= 16 for v in first.values())
    assert ensure_secrets(repo, {}) == path and parse_env_file(path) == first
    settings = load_settings(repo, {})
    assert settings.aws_secret_access_key == first["AWS_SECRET_ACCESS_KEY"]
    assert settings.client_env()["AWS_ACCESS_KEY_ID"] == first["AWS_ACCESS_KEY_ID"]


def test_a_secret_the_environment_sets_is_not_generated(repo: Path) -> None:
    path = ensure_secrets(repo, {"POSTGRES_PASSWORD": "mine"})
    assert "POSTGRES_PASSWORD" not in parse_env_file(path)


def test_no_secret_in_the_tracked_settings_or_compose_file() -> None:
    values = parse_env_file(ROOT / SETTINGS_FILE)
    assert not set(SECRET_NAMES) & set(values)
    compose = (ROOT / "stack" / "compose.yaml").read_text()
    for name in SECRET_NAMES:
        # only references (${NAME} for compose, $$NAME for a container's shell), never a value
        assert not re.search(rf"\b{name}[ \t]*[:=][ \t]*[^\s$]", compose), name


def test_a_shells_cloud_keys_never_become_the_own_stores_login(repo: Path) -> None:
    """Real AWS keys exported in the shell: the stack's SeaweedFS still uses generated ones."""
    shell = {"AWS_ACCESS_KEY_ID": "AKIAREALCLOUDKEY", "AWS_SECRET_ACCESS_KEY": "real-secret"}
    path = ensure_secrets(repo, shell)
    generated = parse_env_file(path)
    assert set(generated) == set(SECRET_NAMES)
    settings = load_settings(repo, shell)
    assert settings.aws_access_key_id == generated["AWS_ACCESS_KEY_ID"] != "AKIAREALCLOUDKEY"
    external = load_settings(repo, {**shell, "S3_ENDPOINT_URL": "https://s3.example.com"})
    assert external.aws_access_key_id == "AKIAREALCLOUDKEY"  # an external store: the user's keys


def test_no_client_settings_without_secrets(repo: Path) -> None:
    with pytest.raises(StackError, match=r"POSTGRES_PASSWORD is empty: run `make up`"):
        load_settings(repo, {}).client_env()
