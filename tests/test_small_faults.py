"""Smaller faults of issue 10 (item 8), each reproduced for real.

* a ``sqlite:`` source outside ``ingest.data_root`` (a real sqlite file) is refused;
* a URL with credentials (basic auth + a presigned query, served by a real HTTP server on
  127.0.0.1 that checks them) is fetched, but the manifest, the logs, the errors and the
  MLflow params of the real train stage hold it redacted;
* ``train.batch_size`` above the training rows warns, naming both numbers.
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import threading
import traceback
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import mlflow
import pandas as pd
import pytest

from stages.common.config import IngestParams
from stages.common.errors import DataError
from stages.common.redact import redact_url, scrubbed_logs
from stages.ingest import stage as ingest
from tests.builders import breast_cancer_frame, build_trained, make_params

USER, PASSWORD = "etl", "pw-7f3a9c2e"
SIGNATURE, CREDENTIAL = "sig0d1e2f3a4b5c6d7e8f", "AKIAEXAMPLE2026"
WRONG_SIGNATURE = "sigWRONG9f8e7d6c5b"
SECRETS = (PASSWORD, SIGNATURE, CREDENTIAL, WRONG_SIGNATURE)


def tiny_frame() -> pd.DataFrame:
    return pd.DataFrame({"x": [0.5, 1.5, 2.5], "color": ["red", "blue", "red"], "label": [0, 1, 0]})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "source").mkdir()
    return tmp_path / "source"


@pytest.fixture
def raw(tmp_path: Path, root: Path) -> Path:
    """A data/raw from an earlier good run: a refused source must leave it as it is."""
    tiny_frame().to_csv(root / "good.csv", index=False)
    ingest.run(
        IngestParams(source=str(root / "good.csv"), target="label", data_root=str(root)),
        tmp_path / "raw",
    )
    return tmp_path / "raw"


def sqlite_file(path: Path) -> Path:
    with sqlite3.connect(path) as conn:
        tiny_frame().to_sql("sales", conn, index=False)
    return path


# ----------------------------------------------------------------------------- sqlite


def test_sqlite_source_outside_the_data_root_is_refused_naming_path_root_and_fix(
    tmp_path: Path, root: Path, raw: Path
) -> None:
    outside = sqlite_file(tmp_path / "elsewhere.db")
    before = snapshot(raw)

    with pytest.raises(DataError) as info:
        ingest.run(
            IngestParams(
                source=f"sqlite:///{outside}", table="sales", target="label", data_root=str(root)
            ),
            raw,
        )

    message = str(info.value)
    assert info.value.rule == "inside_data_root"
    assert str(outside) in message and f"ingest.data_root ({root.resolve()})" in message
    assert f"ingest.source: sqlite:///{root}/elsewhere.db" in message
    assert snapshot(raw) == before


def test_sqlite_source_through_a_symlink_or_missing_is_refused_and_none_is_created(
    tmp_path: Path, root: Path, raw: Path
) -> None:
    (root / "link.db").symlink_to(sqlite_file(tmp_path / "elsewhere.db"))
    with pytest.raises(DataError, match="outside ingest.data_root"):
        ingest.run(
            IngestParams(
                source=f"sqlite:///{root / 'link.db'}",
                table="sales",
                target="label",
                data_root=str(root),
            ),
            raw,
        )

    with pytest.raises(DataError, match="not found") as info:
        ingest.run(
            IngestParams(
                source=f"sqlite:///{root / 'typo.db'}",
                table="sales",
                target="label",
                data_root=str(root),
            ),
            raw,
        )
    assert info.value.rule == "exists" and not (root / "typo.db").exists()


def test_sqlite_source_inside_the_data_root_is_read(tmp_path: Path, root: Path) -> None:
    inside = sqlite_file(root / "sales.db")

    result = ingest.run(
        IngestParams(
            source=f"sqlite:///{inside}", table="sales", target="label", data_root=str(root)
        ),
        tmp_path / "raw",
    )

    assert result.rows_added == 3


# ----------------------------------------------------------------------------- credentials


class CheckingHandler(SimpleHTTPRequestHandler):
    """Serves its folder only to requests with the basic auth and the signed query."""

    def log_message(self, *args: object) -> None:
        pass

    def _allowed(self) -> bool:
        wanted = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        query = parse_qs(urlsplit(self.path).query)
        return (
            self.headers.get("Authorization") == wanted
            and query.get("X-Amz-Signature") == [SIGNATURE]
            and query.get("X-Amz-Credential") == [CREDENTIAL]
        )

    def do_HEAD(self) -> None:
        if not self._allowed():
            return self.send_error(403, f"signature does not match for {self.path}")
        return super().do_HEAD()

    def do_GET(self) -> None:
        if not self._allowed():
            return self.send_error(403, f"signature does not match for {self.path}")
        return super().do_GET()


@pytest.fixture
def signed_server(tmp_path: Path) -> Iterator[str]:
    """``base URL`` of a real HTTP server on 127.0.0.1 that demands the credentials."""
    folder = tmp_path / "www"
    folder.mkdir()
    breast_cancer_frame().to_csv(folder / "data.csv", index=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(CheckingHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def signed_url(host: str, signature: str = SIGNATURE) -> str:
    return (
        f"http://{USER}:{PASSWORD}@{host}/data.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential={CREDENTIAL}&X-Amz-Signature={signature}"
    )


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def test_url_credentials_fetch_the_data_but_never_reach_manifest_logs_or_mlflow(
    tmp_path: Path, signed_server: str, mlflow_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = signed_url(signed_server)
    with caplog.at_level("DEBUG"):
        # format csv: the old code read it too (its suffix check saw ".csv?X-Amz-...")
        result = ingest.run(
            IngestParams(source=url, target="target", format="csv"), tmp_path / "raw"
        )
        manifest = (tmp_path / "raw" / "manifest.json").read_text()

        params = make_params(
            {"ingest": {"source": url, "target": "target"}, "train": {"max_epochs": 2}}
        )
        build_trained(tmp_path / "run", params, breast_cancer_frame())

    assert result.rows_added == len(breast_cancer_frame())  # the fetch used the credentials
    shown = json.loads(manifest)["source"]
    assert shown == (
        f"http://***@{signed_server}/data.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=***&X-Amz-Signature=***"
    )
    assert_no_secret(manifest)
    assert_no_secret(caplog.text)
    assert "holds credentials" in caplog.text  # params.yaml/git/dvc.lock keep them: said so

    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.data.params["ingest.source"] == shown
    assert_no_secret(json.dumps(run.data.params))
    config = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/config/params.json")
    assert config["ingest"]["source"] == shown and params.ingest.source == url


def test_a_refused_signed_url_names_the_redacted_url_only(
    tmp_path: Path, signed_server: str, raw: Path
) -> None:
    with pytest.raises(DataError) as info:
        ingest.run(
            IngestParams(source=signed_url(signed_server, WRONG_SIGNATURE), target="target"), raw
        )

    assert "***" in info.value.file and info.value.rule == "access"
    assert "HTTP 403" in str(info.value) and "presigned URL expires" in str(info.value)
    shown = "".join(traceback.format_exception(info.value))  # what logger.exception prints
    assert_no_secret(shown)


def test_a_secret_from_the_environment_is_used_and_the_placeholder_shown(
    tmp_path: Path, signed_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_SALES_PASSWORD", PASSWORD)
    monkeypatch.setenv("TEST_SALES_SIG", SIGNATURE)
    source = (
        f"http://{USER}:${{TEST_SALES_PASSWORD}}@{signed_server}/data.csv?"
        f"X-Amz-Credential={CREDENTIAL}&X-Amz-Signature=${{TEST_SALES_SIG}}"
    )

    ingest.run(IngestParams(source=source, target="target"), tmp_path / "raw")

    manifest = ingest.read_manifest(tmp_path / "raw")
    assert manifest["rows"] == len(breast_cancer_frame())
    assert (
        "${TEST_SALES_SIG}" in manifest["source"] and "X-Amz-Credential=***" in manifest["source"]
    )
    monkeypatch.delenv("TEST_SALES_SIG")
    with pytest.raises(DataError, match="TEST_SALES_SIG is not set"):
        ingest.run(IngestParams(source=source, target="target"), tmp_path / "raw")


def test_records_of_child_loggers_and_other_threads_are_scrubbed_during_a_fetch(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A filter on the "fsspec" logger never saw "fsspec.asyn", "s3fs" or "botocore.endpoint"
    # records: child loggers do not inherit it. fsspec fetches on a thread of its own.
    url = signed_url("127.0.0.1:9", SIGNATURE)
    caplog.set_level(logging.DEBUG)
    for name in (
        "fsspec",
        "fsspec.asyn",
        "s3fs",
        "botocore",
        "botocore.endpoint",
        "aiohttp",
        "aiohttp.client",
    ):
        # An earlier test's logging config (Prefect, uvicorn) may have disabled, raised or
        # detached them: this test is about the redaction, not about that config.
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "disabled", False)
        monkeypatch.setattr(logger, "level", logging.NOTSET)
        monkeypatch.setattr(logger, "propagate", True)

    def log_from(name: str) -> None:
        logger = logging.getLogger(name)
        logger.debug("GET %s", url)
        try:
            raise OSError(f"cannot fetch {url}")
        except OSError:
            logger.exception("failed")

    with scrubbed_logs(url):
        for name in ("fsspec.asyn", "s3fs", "botocore.endpoint", "aiohttp.client"):
            log_from(name)
        thread = threading.Thread(target=log_from, args=("fsspec.asyn",))
        thread.start()
        thread.join()

    assert_no_secret(caplog.text)  # messages, arguments and tracebacks
    masked = [(r.name, r.thread) for r in caplog.records if "X-Amz-Signature=***" in r.getMessage()]
    assert {name for name, _ in masked} == {
        "fsspec.asyn",
        "s3fs",
        "botocore.endpoint",
        "aiohttp.client",
    }
    assert {thread for _, thread in masked} == {threading.get_ident(), thread.ident}
    logging.getLogger("s3fs").debug("after %s", url)  # the fetch is over: records as they are
    assert SIGNATURE in caplog.records[-1].getMessage()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://ghp_abc123@host/x.csv", "https://***@host/x.csv"),  # a token as the user
        ("postgresql://etl:pw@db:5432/sales", "postgresql://etl:***@db:5432/sales"),
        (
            "https://acct.blob.core.windows.net/c/x.csv?sv=2024&sig=Zm9v%2Bbar&se=2026",
            "https://acct.blob.core.windows.net/c/x.csv?sv=2024&sig=***&se=2026",
        ),
        ("https://host/x.csv?api_key=k1&page=2", "https://host/x.csv?api_key=***&page=2"),
        ("https://host/x.csv?X-Amz-Signature=${SIG}", "https://host/x.csv?X-Amz-Signature=${SIG}"),
        ("https://host/x.csv", "https://host/x.csv"),
        ("data/source/x.csv", "data/source/x.csv"),
    ],
)
def test_redacted_urls_mask_the_secret_and_keep_the_rest(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# ----------------------------------------------------------------------------- batch size


def test_batch_size_above_the_training_rows_warns_with_both_numbers(
    tmp_path: Path, mlflow_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    frame = breast_cancer_frame().groupby("target").head(25)  # 50 rows: ~30 for training
    params = make_params({"train": {"batch_size": 500, "max_epochs": 2}})

    with caplog.at_level("WARNING"):
        build_trained(tmp_path, params, frame)

    train_rows = len(pd.read_parquet(tmp_path / "features" / "train.parquet"))
    warned = [r.getMessage() for r in caplog.records if "train.batch_size" in r.getMessage()]
    assert warned == [
        (
            f"train.batch_size 500 is larger than the {train_rows} training rows: "
            f"every step takes the whole split (one step per epoch); set "
            f"train.batch_size to {train_rows} or less"
        )
    ]
