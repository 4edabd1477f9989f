"""The model service for real on 127.0.0.1, in a thread of the test process (a free port)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from serving.app import ServiceConfig, create_app


@contextmanager
def live_service(config: ServiceConfig, start_s: float = 60) -> Iterator[int]:
    """Start the service; yield its port once ``/ready`` answers 200 (a model is loaded);
    stop it on the way out."""
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config), host="127.0.0.1", port=0, log_level="warning", access_log=False
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_s
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        while request(port, "GET", "/ready")[0] != 200:
            assert time.monotonic() < deadline, "no model loaded"
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def request(port: int, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    """One request (``body`` sent as JSON) on a new connection; the status and the body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, data, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
