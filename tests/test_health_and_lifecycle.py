"""Health states, background loading, a responsive event loop, and disconnects that stop generation."""

from __future__ import annotations

import threading
import time

import httpx
from conftest import hold_loading

USER = {"role": "user", "content": "舌"}
LONG = {"messages": [USER], "max_tokens": 1500, "ignore_eos": True}


def test_loading_then_ready(start_server, tiny_checkpoint, tmp_path):
    folder, release = hold_loading(tiny_checkpoint, tmp_path / "held")
    server = start_server(wait=False, model=str(folder))
    try:
        with server.client() as http:
            assert http.get("/live").json() == {"status": "alive"}
            health = http.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "loading" and "loading" in health.json()["phase"]
            chat = http.post("/v1/chat/completions", json={"messages": [USER]})
            assert chat.status_code == 503 and chat.headers["Retry-After"]
            assert "loading" in chat.json()["error"]["message"]
            release.set()
            ready = server.wait_ready()
            assert ready["status"] == "ok" and ready["device"] == "cpu" and ready["dtype"] == "float32"
            assert ready["random_test_model"] is True and "gpu_memory" in ready
            assert http.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 2}).status_code == 200
    finally:
        release.set()


def test_failed_load_is_reported(start_server, tmp_path):
    server = start_server(wait=False, model=str(tmp_path / "no-such-checkpoint"))
    deadline = time.monotonic() + 20
    with server.client() as http:
        while (health := http.get("/health")).json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "no-such-checkpoint" in health.json()["error"]
        chat = http.post("/v1/chat/completions", json={"messages": [USER]})
        assert chat.status_code == 503 and "failed to load" in chat.json()["error"]["message"]
        assert http.get("/live").status_code == 200


def test_health_answers_quickly_during_a_long_generation(server):
    with server.client() as http:
        worker = threading.Thread(target=lambda: http.post("/v1/chat/completions", json=LONG))
        worker.start()
        _wait_until(lambda: server.engine.stats.running == 1)
        timings = []
        for _ in range(10):
            started = time.perf_counter()
            assert http.get("/health").status_code == 200
            timings.append(time.perf_counter() - started)
        assert server.engine.stats.running == 1, "the generation should still be running"
        assert max(timings) < 0.5, timings
        worker.join()


def test_disconnect_stops_generation(server):
    longest = {"messages": [USER], "max_tokens": 3900, "ignore_eos": True}
    for stream in (False, True):
        before = server.engine.stats.tokens_generated
        with httpx.Client(base_url=server.url, timeout=httpx.Timeout(30, read=0.3)) as http:
            try:
                if stream:
                    with http.stream("POST", "/v1/chat/completions", json=longest | {"stream": True}) as response:
                        next(response.iter_lines())
                else:
                    http.post("/v1/chat/completions", json=longest)
            except httpx.ReadTimeout:
                pass
        _wait_until(lambda: server.engine.stats.running == 0, timeout=2.0)  # 3,900 tokens would take far longer
        assert server.engine.stats.tokens_generated - before < 3900
        started = time.perf_counter()
        with server.client() as http:
            assert http.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 2}).status_code == 200
        assert time.perf_counter() - started < 1.0


def test_concurrent_requests_all_complete(server):
    results = {}

    def ask(i):
        with server.client() as http:
            results[i] = http.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 50,
                                                                 "ignore_eos": True})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 50 for r in results.values())


def test_stream_sends_heartbeats_while_waiting(start_server):
    server = start_server(stream_heartbeat_seconds=0.05, max_num_seqs=1)  # the stream waits for the one slot
    with server.client() as http:
        worker = threading.Thread(target=lambda: http.post("/v1/chat/completions", json=LONG))
        worker.start()
        _wait_until(lambda: server.engine.stats.running == 1)
        with http.stream("POST", "/v1/chat/completions", json={"messages": [USER], "max_tokens": 2,
                                                               "stream": True}) as response:
            lines = [line for line in response.iter_lines() if line]
        worker.join()
    assert ": keep-alive" in lines
    assert lines[-1] == "data: [DONE]"


def _wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.005)
