"""What an operator relies on: metrics, request ids and JSON logs, overload protection, rate limits, timeouts and
a graceful SIGTERM."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest
from conftest import children_of, free_port, image_data_url, is_running, serve_cli, tongue_photo, wait_healthy
from prometheus_client.parser import text_string_to_metric_families

USER = {"role": "user", "content": "舌"}


def _scrape(http) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _delta(before, after, name, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_move_by_what_was_served(server):
    with server.client() as http:
        before = _scrape(http)
        plain = http.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 6, "ignore_eos": True})
        with http.stream("POST", "/v1/chat/completions", json={"messages": [USER], "max_tokens": 5,
                         "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}) as stream:
            usage_line = [line for line in stream.iter_lines() if '"usage":{' in line][-1]
        photo = image_data_url(tongue_photo())
        image = http.post("/v1/chat/completions", json={"max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": photo}}]}]})
        after = _scrape(http)
    streamed_usage = json.loads(usage_line.removeprefix("data: "))["usage"]
    prompt = plain.json()["usage"]["prompt_tokens"] + streamed_usage["prompt_tokens"] + image.json()["usage"][
        "prompt_tokens"]
    assert _delta(before, after, "shizhen:prompt_tokens_total") == prompt
    assert _delta(before, after, "shizhen:generation_tokens_total") == 6 + 5 + 1
    assert _delta(before, after, "shizhen:request_success_total", finished_reason="length") == 3
    assert _delta(before, after, "shizhen:http_requests_total", method="POST", route="/v1/chat/completions",
                  status="200") == 3
    assert _delta(before, after, "shizhen:time_to_first_token_seconds_count") == 3
    assert _delta(before, after, "shizhen:e2e_request_latency_seconds_count") == 3
    assert _delta(before, after, "shizhen:inter_token_latency_seconds_count") == 5 + 4
    assert _delta(before, after, "shizhen:image_decode_seconds_count") == 1
    assert _delta(before, after, "shizhen:image_bytes_sum") == len(base64.b64decode(photo.split(",", 1)[1]))
    assert after[("shizhen:model_load_seconds", ())] > 0
    assert after[("shizhen:num_requests_running", ())] == 0
    assert ("shizhen:kv_cache_usage_perc", ()) in after


def test_metrics_can_require_the_api_key(start_server):
    server = start_server(api_keys="k1", metrics_require_api_key=True)
    with server.client() as http:
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200
    open_server = start_server(api_keys="k1")
    with open_server.client() as http:
        assert http.get("/metrics").status_code == 200


def test_request_ids_are_echoed_or_assigned(server):
    with server.client() as http:
        mine = http.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 1},
                         headers={"X-Request-ID": "clinic-7f3a"})
        assigned = http.get("/v1/models")
        refused = http.get("/v1/models", headers={"X-Request-ID": "bad id with spaces"})
    assert mine.headers["x-request-id"] == "clinic-7f3a"
    assert len(assigned.headers["x-request-id"]) == 32
    assert refused.headers["x-request-id"] != "bad id with spaces"


def test_burst_beyond_the_queue_gets_429_and_accepted_requests_complete(start_server):
    server = start_server(max_num_seqs=1, max_waiting_requests=2)
    results = []

    def ask():
        with server.client() as http:
            results.append(http.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 300,
                                                                    "ignore_eos": True}))

    threads = [threading.Thread(target=ask) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    refused = [r for r in results if r.status_code == 429]
    accepted = [r for r in results if r.status_code == 200]
    assert refused and accepted and len(refused) + len(accepted) == 10
    assert all(r.headers["Retry-After"] and r.json()["error"]["code"] == "server_overloaded" for r in refused)
    assert all(r.json()["usage"]["completion_tokens"] == 300 for r in accepted)


def test_rate_limit_trips_and_recovers(start_server):
    server = start_server(rate_limit="3/second")
    with server.client() as http:
        answers = [http.get("/v1/models") for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers[:3]] == ["2", "1", "0"]
        limited = answers[3]
        assert limited.json()["error"]["type"] == "rate_limit_error" and int(limited.headers["Retry-After"]) >= 1
        assert limited.headers["x-ratelimit-limit-requests"] == "3"
        assert http.get("/health").status_code == 200  # probes are never limited
        time.sleep(1.1)
        assert http.get("/v1/models").status_code == 200


def test_request_timeout_ends_the_generation_and_says_so(start_server):
    server = start_server(request_timeout_seconds=0.3)
    long = {"messages": [USER], "max_tokens": 3900, "ignore_eos": True}
    with server.client() as http:
        started = time.perf_counter()
        response = http.post("/v1/chat/completions", json=long)
        assert response.status_code == 504 and "0.3 s request timeout" in response.json()["error"]["message"]
        assert time.perf_counter() - started < 2
        with http.stream("POST", "/v1/chat/completions", json=long | {"stream": True}) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert "request_timeout" in lines[-2] and lines[-1] == "data: [DONE]"
    deadline = time.monotonic() + 2
    while server.engine.stats.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.engine.stats.running == 0


# --- real processes: a shared Redis, JSON logs, SIGTERM ----------------------------------------------------------
@pytest.fixture
def redis_url():
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (the README's install command installs it)")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    process.terminate()
    process.wait(10)


def test_rate_limit_is_shared_through_redis_by_two_processes(tiny_checkpoint, redis_url):
    ports = [free_port(), free_port()]
    processes = [serve_cli(["--model", str(tiny_checkpoint), "--host", "127.0.0.1", "--port", str(port),
                            "--rate-limit", "4/minute", "--rate-limit-storage-url", redis_url]) for port in ports]
    try:
        for port, process in zip(ports, processes):
            wait_healthy(f"http://127.0.0.1:{port}", process)
        statuses = [httpx.get(f"http://127.0.0.1:{ports[i % 2]}/v1/models").status_code for i in range(6)]
        assert statuses == [200, 200, 200, 200, 429, 429]
    finally:
        for process in processes:
            process.terminate()
            process.communicate(timeout=30)


def test_sigterm_lets_the_stream_finish_then_exits_cleanly(tiny_checkpoint):
    port = free_port()
    # the grace period is far longer than 1,000 tokens of the tiny model take on the slowest machine; answers that
    # outlast it are cut (test_hardening), so this test does not race the machine's speed
    process = serve_cli(["--model", str(tiny_checkpoint), "--host", "127.0.0.1", "--port", str(port),
                         "--max-context-length", "4096", "--shutdown-grace-seconds", "300"],
                        {"SHIZHEN_LOG_JSON": "true"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
        [engine] = children_of(process.pid)
        assert httpx.get(f"{url}/v1/models", headers={"X-Request-ID": "probe-1"}).status_code == 200
        received = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, headers={"X-Request-ID": "long-1"},
                          json={"messages": [USER], "max_tokens": 1000, "ignore_eos": True, "stream": True,
                                "stream_options": {"include_usage": True}}) as stream:
            for line in stream.iter_lines():
                received.append(line)
                if len(received) == 10:
                    process.send_signal(signal.SIGTERM)
                    time.sleep(0.1)
                    refused = httpx.post(f"{url}/v1/chat/completions", json={"messages": [USER]})
                    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
                    assert httpx.get(f"{url}/health").json()["status"] == "draining"
        data = [line for line in received if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        assert json.loads(data[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 1000
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-2000:]
    assert not is_running(engine), "the engine process stops with the server"
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert len(records) == len(output.strip().splitlines())  # every line is JSON
    access = {r.get("request_id"): r for r in records if r["logger"] == "shizhen.access"}
    assert access["probe-1"]["status"] == 200
    long_line = access["long-1"]
    assert long_line["completion_tokens"] == 1000 and long_line["prompt_tokens"] > 0
    assert long_line["ttft_ms"] > 0 and long_line["total_ms"] >= long_line["ttft_ms"]
    assert "舌" not in output  # message contents are never logged
