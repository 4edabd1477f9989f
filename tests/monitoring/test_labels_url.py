"""Labels from a URL (review #6): read with a timeout from a real HTTP server on 127.0.0.1; an
HTTP error, a hung endpoint or another scheme is a LabelsError naming the URL; ``file://`` is
read as its path."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from monitoring.performance import LabelsError, read_labels

CSV = b"request_id,label\nr1,1\nr2,0\n"


class _Labels(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path != "/labels.csv":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/csv")
        self.send_header("Content-Length", str(len(CSV)))
        self.end_headers()
        self.wfile.write(CSV)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Labels)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_labels_from_an_http_url_and_a_clear_error_for_an_http_error(server: str) -> None:
    got = read_labels(f"{server}/labels.csv")
    assert got.to_dict("list") == {"request_id": ["r1", "r2"], "label": ["1", "0"]}
    with pytest.raises(LabelsError, match=rf"{server}/nothing.csv: cannot fetch .*404"):
        read_labels(f"{server}/nothing.csv")


def test_a_hung_labels_endpoint_times_out_as_a_labels_error() -> None:
    # a socket that listens but never answers: the connection is made, the reply never comes
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(1)
        url = f"http://127.0.0.1:{hung.getsockname()[1]}/labels.csv"
        started = time.monotonic()
        with pytest.raises(LabelsError, match=rf"{url}: cannot fetch .*timeout 0.5 s"):
            read_labels(url, timeout_s=0.5)
        assert time.monotonic() - started < 10


def test_a_file_url_is_read_as_its_path_and_another_scheme_is_refused(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_bytes(CSV)
    assert len(read_labels((tmp_path / "labels.csv").as_uri())) == 2
    assert read_labels((tmp_path / "missing").as_uri()) is None  # not arrived yet, as a path
    with pytest.raises(LabelsError, match=r"ftp://host/labels.csv: cannot read labels from"):
        read_labels("ftp://host/labels.csv")
