"""Issue 30 against a real `flashlm serve` on loopback (started as tests/test_serve.py does):
a huge body is turned away before any work while /health stays fast, a client that leaves
mid-body costs one log line, a tiny top_p is answered, a connection that never sends its
headers is closed."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest

from test_serve import Served

TEXT = "/v1/completions"


@pytest.fixture(scope="module")
def served(llama_store, tmp_path_factory):
    s = Served(llama_store[1], tmp_path_factory.mktemp("p2-serve") / "server.log")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_health_stays_fast_while_a_huge_body_is_turned_away(served):
    """On main a 15 MB /v1/completions body was read, parsed and tokenised on the event loop:
    /health took 13.7 s and RSS rose ~580 MB before the 400."""
    body = b'{"model": "store", "max_tokens": 1, "prompt": "' + b"word " * (3 * 2**20) + b'"}'
    got: dict[str, object] = {}

    def send() -> None:
        try:
            r = httpx.post(served.url + TEXT, content=body, headers={"Content-Type": "application/json"}, timeout=60)
            got["status"], got["body"] = r.status_code, r.json()
        except httpx.TransportError as e:  # the server may close before reading all of it
            got["status"] = type(e).__name__

    t = threading.Thread(target=send)
    t.start()
    worst = 0.0
    while t.is_alive():
        t0 = time.perf_counter()
        assert httpx.get(served.url + "/health", timeout=10).status_code == 200
        worst = max(worst, time.perf_counter() - t0)
    t.join()
    assert got["status"] in (413, "RemoteProtocolError", "WriteError", "ReadError"), got
    if got["status"] == 413:
        assert got["body"]["error"]["code"] == "request_too_large"
    assert worst < 1.0, f"/health took {worst:.2f} s while the huge body was handled"


def test_a_prompt_that_cannot_fit_is_refused_before_tokenising(served):
    with openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0) as client, \
            pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="store", prompt="x" * 200_000, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
    assert "characters" in e.value.body["message"]


def test_a_client_leaving_mid_body_costs_one_log_line(served):
    before = served.log().splitlines()
    cancelled = served.health()["cancelled"]
    with socket.create_connection(("127.0.0.1", served.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n" + b'{"prompt": "abc"')
    served.wait_health(lambda h: h["cancelled"] > cancelled)
    time.sleep(0.3)  # anything else it would log comes with the same event
    new = served.log().splitlines()[len(before):]
    assert len(new) == 1 and "Traceback" not in "\n".join(new), new
    assert "disconnected" in new[0]
    assert served.health()["status"] == "ok"


def test_a_tiny_top_p_is_answered_not_a_500(served):
    with openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0) as client:
        for top_p in (1e-46, 1e-300):
            r = client.completions.create(model="store", prompt="The quick", max_tokens=3, temperature=1.0,
                                          top_p=top_p)
            assert r.choices[0].finish_reason in ("length", "stop")


def test_a_connection_that_never_sends_its_headers_is_closed(served):
    with socket.create_connection(("127.0.0.1", served.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost:")  # and nothing more
        s.settimeout(30)
        t0 = time.monotonic()
        assert s.recv(1024) == b""  # closed by the server (--header-timeout, default 10 s)
        assert time.monotonic() - t0 < 15
    assert served.health()["status"] == "ok"
