"""Operations against a real `shimmy serve`: graceful shutdown while a stream
runs, slow and idle clients, the request log and /metrics over HTTP.  Timing
only bounds waits (hang guards); no assertion depends on how fast this machine is."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL_ID, wait_for

LONG = {  # runs for half a minute or more (a slot holds 2048 tokens): a disconnect or the shutdown ends it
    "model": MODEL_ID, "stream": True, "max_tokens": 1900, "temperature": 0,
    "messages": [{"role": "user", "content": "Write a very long story."}], "logit_bias": {"2": -100},
}
HI = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def health(server) -> httpx.Response:
    return httpx.get(server.base + "/health", timeout=10)


def data_lines(lines) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def test_shutdown_while_a_stream_runs(start_server, smollm2_path, validate):
    """SIGTERM: /health turns 503, new and queued requests get 503 with Retry-After, the running
    stream ends after the grace period with an error event and [DONE], and the exit code is 0."""
    server = start_server(["--model", str(smollm2_path), "--no-demo", "--shutdown-grace", "2", "--no-cache"],
                          SHIMMY_PARALLEL="1")
    queued: dict = {}
    with httpx.stream("POST", server.url + "/chat/completions", json=LONG, timeout=120) as running:
        lines = running.iter_lines()
        received = []
        while len(data_lines(received)) < 3:
            received.append(next(lines))
        waiter = threading.Thread(target=lambda: queued.setdefault(
            "r", httpx.post(server.url + "/chat/completions", json=HI, timeout=120)))
        waiter.start()
        assert wait_for(lambda: sum(m.get("queued", 0) for m in health(server).json()["models"]) == 1)

        server.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: health(server).status_code == 503, timeout=10)
        assert health(server).json()["status"] == "shutting_down"
        refused = httpx.post(server.url + "/chat/completions", json=HI, timeout=30)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        validate(refused.json(), "ErrorResponse")
        assert refused.json()["error"]["code"] == "shutting_down"

        received += list(lines)  # until the server ends the stream
    waiter.join(timeout=60)
    assert queued["r"].status_code == 503 and queued["r"].json()["error"]["code"] == "shutting_down"
    assert int(queued["r"].headers["retry-after"]) >= 1

    events = data_lines(received)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    error = json.loads(events[-2])
    validate(error, "ErrorResponse")
    assert error["error"]["code"] == "shutting_down"
    assert all("choices" in json.loads(e) for e in events[:-2])
    assert server.proc.wait(timeout=60) == 0
    server.stop()
    assert "shimmy: stopped" in "".join(server.lines)


def test_a_stream_that_ends_within_the_grace_period_completes(start_server, smollm2_path):
    server = start_server(["--model", str(smollm2_path), "--no-demo", "--shutdown-grace", "120", "--no-cache"])
    body = {**LONG, "max_tokens": 40}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=120) as running:
        lines = running.iter_lines()
        received = [next(lines)]
        server.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: health(server).status_code == 503, timeout=10)
        received += list(lines)
    events = [json.loads(e) for e in data_lines(received)[:-1]]
    assert data_lines(received)[-1] == "[DONE]"
    assert all("error" not in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(e["choices"][0]["delta"].get("content") or "") > 0 for e in events) >= 30
    assert server.proc.wait(timeout=100) == 0  # well before the grace period would have ended


@pytest.fixture(scope="module")
def one_slot(start_server, smollm2_path):
    server = start_server(["--model", str(smollm2_path), "--no-demo", "--client-timeout", "1"],
                          SHIMMY_PARALLEL="1")
    health(server).raise_for_status()
    return server


def test_a_slow_client_holds_no_model_slot_and_an_idle_one_is_closed(one_slot):
    host, port = one_slot.base.removeprefix("http://").rsplit(":", 1)
    body = json.dumps(HI).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    slow = socket.create_connection((host, int(port)))
    try:
        slow.sendall(head + body[:5])
        for byte in body[5:15]:  # dripping: waitress holds the request until it is whole
            slow.sendall(bytes([byte]))
            time.sleep(0.05)
            assert health(one_slot).json()["models"] == [] or \
                health(one_slot).json()["models"][0]["busy_slots"] == 0
        # With one slot, this answer proves the dripping client holds none.
        r = httpx.post(one_slot.url + "/chat/completions", json=HI, timeout=120)
        assert r.status_code == 200
        # Once it stops sending, the half-sent request is dropped after --client-timeout.
        slow.settimeout(60)
        assert slow.recv(1024) == b""
    finally:
        slow.close()


def test_request_log_and_metrics_over_http(start_server, smollm2_path):
    one_slot = start_server(["--model", str(smollm2_path), "--no-demo"])
    r = httpx.post(one_slot.url + "/chat/completions", headers={"X-Request-Id": "log-check-1"}, timeout=120,
                   json={**HI, "messages": [{"role": "user", "content": "a private thought"}]})
    assert r.status_code == 200 and r.headers["x-request-id"] == "log-check-1"
    text = httpx.get(one_slot.base + "/metrics", timeout=10).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("shimmy_requests", "shimmy_request_duration_seconds", "shimmy_time_to_first_token_seconds",
                 "shimmy_prompt_tokens", "shimmy_completion_tokens", "shimmy_cache_hits", "shimmy_cache_misses",
                 "shimmy_busy_slots", "shimmy_queue_depth", "shimmy_loaded_models", "shimmy_prompt_tokens_decoded"):
        assert name in fams, name
    [loaded] = fams["shimmy_loaded_models"].samples
    assert loaded.value == 1
    [decoded] = fams["shimmy_prompt_tokens_decoded"].samples
    assert decoded.labels == {"model": MODEL_ID} and decoded.value == r.json()["usage"]["prompt_tokens"]
    assert one_slot.stop() == 0
    output = "".join(one_slot.lines)
    [line] = [line for line in output.splitlines() if "id=log-check-1" in line]
    assert f"POST /v1/chat/completions 200 model={MODEL_ID} tokens=" in line and "ms id=" in line
    assert "private thought" not in output


def _raw_exchange(server, payload: bytes) -> bytes:
    """Send raw bytes on one connection; return everything received until the server closes it."""
    host, port = server.base.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(30)  # hang guard: a server that keeps the connection open fails the test
    try:
        sock.sendall(payload)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received
    finally:
        sock.close()


@pytest.mark.parametrize("framing", [
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
])
def test_request_smuggling_is_refused_and_the_connection_closed(server, framing):
    """RFC 9112 section 6.3: a request with both Transfer-Encoding and Content-Length gets 400,
    and the request pipelined behind it on the same connection is never answered."""
    smuggled = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                + framing + b"\r\n0\r\n\r\n"
                b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
    received = _raw_exchange(server, smuggled)
    assert received.startswith(b"HTTP/1.1 400 "), received[:200]
    assert received.count(b"HTTP/1.1 ") == 1, received  # nothing answered after it: the connection closed
    assert b'"object": "list"' not in received and b'"object":"list"' not in received


def test_chunked_and_pipelined_requests_still_work(server):
    """The refusal above is only for the ambiguous framing: a plain chunked request and a
    request pipelined after it are both answered on one connection."""
    body = b'{"model": "nope", "messages": []}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    payload = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + chunked +
               b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    received = _raw_exchange(server, payload)
    assert received.count(b"HTTP/1.1 ") == 2, received
    first, second = received.split(b"HTTP/1.1 ")[1:]
    assert first.startswith((b"400 ", b"404 ")) and b'"error"' in first  # the app's JSON answer
    assert second.startswith(b"200 ") and b'"list"' in second
