"""The engine in its own process: a death fails only what it was running, clearly; a new engine process takes over;
one that keeps dying leaves the server failed; and it never outlives the server."""

from __future__ import annotations

import json
import os
import signal
import time

import torch
from conftest import children_of, free_port, is_running, serve_cli, wait_healthy

USER = {"role": "user", "content": "舌"}
LONG = {"messages": [USER], "max_tokens": 3000, "ignore_eos": True}


def _wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_killed_engine_ends_its_streams_with_an_error_and_is_replaced(server):
    first_engine = server.engine.pid
    with server.client() as http:
        data = []
        with http.stream("POST", "/v1/chat/completions", json=LONG | {"stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    data.append(line)
                if len(data) == 5:
                    generated = server.engine.stats.tokens_generated
                    os.kill(first_engine, signal.SIGKILL)
        assert data[-1] == "data: [DONE]"
        error = json.loads(data[-2].removeprefix("data: "))["error"]
        assert error["code"] == "engine_restarting" and "exit code -9" in error["message"]
        restarting = http.get("/health")
        assert restarting.status_code == 503 and restarting.json()["status"] == "loading"
        assert restarting.json()["engine_restarts"] == 1
        health = server.wait_ready(timeout=60)
        assert health["engine_restarts"] == 1 and server.engine.pid != first_engine
        answer = http.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 4})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
    # the counters behind Prometheus' counters add up over engine processes instead of starting again
    assert server.engine.stats.tokens_generated >= generated + answer.json()["usage"]["completion_tokens"]


def test_a_device_fault_ends_the_engine_process_and_a_new_one_serves(start_server, fault_once):
    """After a CUDA fault (not out-of-memory) every later call on the context fails: the engine process exits and
    is replaced. The answer it cut is a 503 to retry."""
    fault = fault_once("shizhen.engine.model_runner.ModelRunner.decode",
                         torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    server = start_server()
    with server.client() as http:
        fault.arm()
        cut = http.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 8, "ignore_eos": True})
        assert cut.status_code == 503 and cut.headers["retry-after"]
        error = cut.json()["error"]
        assert error["code"] == "engine_restarting" and "illegal memory access" in error["message"]
        server.wait_ready(timeout=60)
        assert http.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 4}).status_code == 200
    assert server.engine.restarts == 1


def test_an_engine_that_keeps_dying_leaves_the_server_failed(start_server):
    server = start_server(engine_max_restarts=0)
    os.kill(server.engine.pid, signal.SIGKILL)
    with server.client() as http:
        _wait_until(lambda: http.get("/health").json()["status"] == "failed")
        health = http.get("/health")
        assert health.status_code == 503 and "SHIZHEN_ENGINE_MAX_RESTARTS" in health.json()["error"]
        refused = http.post("/v1/chat/completions", json={"messages": [USER]})
        assert refused.status_code == 503 and "failed" in refused.json()["error"]["message"]


def test_the_engine_process_never_outlives_the_server(tiny_checkpoint):
    """Killed outright (no drain), the server leaves no engine process holding the GPU."""
    port = free_port()
    process = serve_cli(["--model", str(tiny_checkpoint), "--host", "127.0.0.1", "--port", str(port)])
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
        [engine] = children_of(process.pid)
        process.kill()
        process.wait(timeout=30)
        _wait_until(lambda: not is_running(engine), timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
