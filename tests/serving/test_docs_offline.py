"""The service's /docs renders offline, and its OpenAPI document lets "Try it out" score rows.

Static checks (the browser test under tests/browser/ clicks through the page): every script,
style and icon /docs and /redoc load comes from the service itself; /predict's documented
example is the served model's input columns, holds no real row (the document is public) and
scores as it is; the documented error answers are the ones the service gives.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from serving.app import ServiceConfig
from serving.docs import SCORING_PATHS
from tests.serving.conftest import NAME, Registry
from tests.serving.test_app import serve

LOADED = re.compile(r"""<(?:script|link|img)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""", re.I)


@pytest.fixture(scope="module")
def client(registry: Registry) -> Iterator[TestClient]:
    """The service following ``serve-clf@champion``, a token set, a small body limit."""
    yield from serve(
        ServiceConfig(
            model_name=NAME, tracking_uri=registry.uri, token="s3cret", max_body_bytes=4096
        )
    )


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_every_asset_from_the_service_itself(client: TestClient, page: str) -> None:
    html = client.get(page)
    assert html.status_code == 200
    assets = LOADED.findall(html.text)
    assert assets, html.text
    assert not re.search(r"(?:src|href)=[\"']?(?:https?:)?//", html.text), html.text
    for asset in assets:
        assert asset.startswith("/static-offline-docs/"), asset
        assert client.get(asset).status_code == 200, asset


def test_the_documented_example_scores_and_the_errors_are_the_ones_given(
    client: TestClient, registry: Registry
) -> None:
    document = client.get("/openapi.json").json()
    auth = {"Authorization": "Bearer s3cret"}
    columns = list(registry.rows.drop(columns="target", errors="ignore").columns)
    for path in SCORING_PATHS:
        operation = document["paths"][path]["post"]
        example = operation["requestBody"]["content"]["application/json"]["example"]
        assert example["dataframe_split"]["columns"] == columns
        real = set(registry.rows[columns].itertuples(index=False, name=None))
        assert not real & {tuple(row) for row in example["dataframe_split"]["data"]}
        scored = client.post(path, json=example, headers=auth)  # "Try it out" -> "Execute"
        assert scored.status_code == 200, scored.text
        assert len(scored.json()["predictions"]) == len(example["dataframe_split"]["data"])
        assert {"200", "400", "401", "413", "415", "422", "503"} <= set(operation["responses"])
    assert "bearer" in document["components"]["securitySchemes"]

    documented = document["paths"]["/predict"]["post"]["responses"]
    given = {
        "401": client.post("/predict", json=example),
        "413": client.post("/predict", content=b" " * 5000, headers=auth),
        "415": client.post(
            "/predict", content=b"a,b", headers={**auth, "content-type": "text/csv"}
        ),
    }
    for status, answer in given.items():
        assert answer.status_code == int(status)
        shown = documented[status]["content"]["application/json"]["example"]
        assert answer.json()["error_code"] == shown["error_code"], status
