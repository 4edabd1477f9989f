"""S3_ENDPOINT_URL set (real S3, MinIO, R2): `up` starts no store and only checks the bucket;
one it cannot reach fails naming the endpoint, the bucket and the fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from stack.objectstore import check_bucket
from stack.settings import SETTINGS_FILE, StackError, load_settings
from tests.stack.harness import ROOT, free_port


def test_an_unreachable_external_store_names_endpoint_bucket_and_fix(tmp_path: Path) -> None:
    (tmp_path / "stack").mkdir()
    shutil.copy(ROOT / SETTINGS_FILE, tmp_path / SETTINGS_FILE)
    endpoint = f"http://127.0.0.1:{free_port()}"
    env = {
        "S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "POSTGRES_PASSWORD": "p",
    }
    settings = load_settings(tmp_path, env)
    assert not settings.own_object_store and settings.s3_endpoint == endpoint
    assert settings.client_env()["AWS_ENDPOINT_URL_S3"] == endpoint
    with pytest.raises(StackError) as error:
        check_bucket(settings)
    message = str(error.value)
    assert endpoint in message and f"bucket {settings.s3_bucket}" in message
    assert "S3_ENDPOINT_URL" in message and "Create the bucket" in message
