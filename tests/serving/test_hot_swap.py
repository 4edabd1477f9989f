"""Following the registry under load: a real uvicorn server on 127.0.0.1, two client threads,
and ``champion`` moved from v1 to v2 in the middle. Zero failures; every answer is tagged with
the version that computed it (v2's zeroed output layer answers exactly 0.5)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from serving.app import ServiceConfig
from serving.model import load_model
from tests.serving.conftest import NAME, Registry
from tests.serving.live import live_service

CLIENTS = 2
MIN_REQUESTS = 300  # per client; each keeps going (bounded) until it has seen v2
MAX_REQUESTS = 5_000
MOVE_AFTER = 100  # answers received before the alias moves


@pytest.fixture
def server(champion_v1: Registry) -> Iterator[int]:
    """The service on 127.0.0.1 (a free port), polling the alias every 50 ms; yields the port."""
    config = ServiceConfig(model_name=NAME, tracking_uri=champion_v1.uri, poll_interval_s=0.05)
    with live_service(config) as port:
        yield port


def run_client(port: int, bodies: list[bytes], answers: list, seen_v2: threading.Event) -> None:
    """Send rows in turn on one keep-alive connection; record (row, status, header, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for i in range(MAX_REQUESTS):
        if i >= MIN_REQUESTS and seen_v2.is_set():
            break
        row = i % len(bodies)
        conn.request("POST", "/predict", bodies[row], {"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = (row, response.status, response.getheader("X-Model-Version"), response.read())
        answers.append(answer)
        if answer[2] == "2":
            seen_v2.set()
    conn.close()


@pytest.mark.slow
def test_champion_moves_mid_load_with_zero_failed_requests(
    server: int, champion_v1: Registry
) -> None:
    rows = champion_v1.rows.head(20)
    bodies = [
        json.dumps({"dataframe_split": {"columns": list(rows.columns), "data": [row]}}).encode()
        for row in rows.to_numpy().tolist()
    ]
    v1_proba = load_model(f"models:/{NAME}/1").predict(rows)["proba_1"].to_numpy()
    answers: list[list] = [[] for _ in range(CLIENTS)]
    seen_v2 = threading.Event()
    clients = [
        threading.Thread(target=run_client, args=(server, bodies, answers[i], seen_v2))
        for i in range(CLIENTS)
    ]
    for client in clients:
        client.start()

    deadline = time.monotonic() + 120
    while sum(map(len, answers)) < MOVE_AFTER and time.monotonic() < deadline:
        time.sleep(0.005)
    champion_v1.move_alias(2)  # mid-load
    for client in clients:
        client.join(300)

    every = [answer for per_client in answers for answer in per_client]
    assert len(every) >= CLIENTS * MIN_REQUESTS
    assert [a for a in every if a[1] != 200] == []  # zero failed requests
    for per_client in answers:
        versions = [header for _, _, header, _ in per_client]
        assert versions == sorted(versions)  # 1...1 then 2...2: no flapping back
        assert versions[0] == "1" and versions[-1] == "2"  # both served each client
    for row, _, header, body in every:
        answer = json.loads(body)
        proba_1 = answer["predictions"][0]["proba_1"]
        assert answer["model_version"] == header  # header and body agree
        expected = 0.5 if header == "2" else v1_proba[row]  # ...and the numbers are its own
        assert np.isclose(proba_1, expected, atol=1e-6), (header, row, proba_1)
