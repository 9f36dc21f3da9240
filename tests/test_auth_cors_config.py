"""API keys, CORS, settings validation and the `shizhen serve` command itself."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from conftest import free_port, serve_cli

from shizhen.config import Settings

USER = {"role": "user", "content": "舌"}


def test_api_keys_guard_the_v1_routes_only(start_server):
    server = start_server(api_keys="key-one,key-two")
    with server.client() as http:
        assert http.get("/health").status_code == 200 and http.get("/live").status_code == 200
        missing = http.get("/v1/models")
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
        wrong = http.post("/v1/chat/completions", json={"messages": [USER]}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models", headers={"Authorization": "Bearer key-two"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        server.openai(api_key="nope").models.list()
    reply = server.openai(api_key="key-one").chat.completions.create(
        model=server.settings.model_name, messages=[USER], max_tokens=2
    )
    assert reply.usage.completion_tokens <= 2


def test_cors_default_allows_any_origin_with_preflight(server):
    with server.client() as http:
        preflight = http.options("/v1/chat/completions", headers={
            "Origin": "https://clinic.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        })
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] in {"*", "https://clinic.example"}
        assert "POST" in preflight.headers["access-control-allow-methods"]


def test_cors_can_be_restricted(start_server):
    server = start_server(cors_allowed_origins="https://clinic.example")
    with server.client() as http:
        allowed = http.get("/v1/models", headers={"Origin": "https://clinic.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://clinic.example"
        refused = http.options("/v1/chat/completions", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in http.get("/v1/models", headers={"Origin": "https://evil.example"}).headers


def test_settings_read_env_and_cli_flags_override(monkeypatch):
    monkeypatch.setenv("SHIZHEN_PORT", "9001")
    monkeypatch.setenv("SHIZHEN_API_KEYS", "a, b")
    monkeypatch.setenv("SHIZHEN_MAX_MEMORY", "0=75GiB,cpu=100GiB")
    monkeypatch.setenv("HF_HOME", "/workspace/models")
    settings = Settings(_cli_parse_args=["--port", "9002", "--served-model-name", "shizhen"])
    assert settings.port == 9002 and settings.model_name == "shizhen"
    assert [k.get_secret_value() for k in settings.api_keys] == ["a", "b"]
    assert settings.max_memory == {"0": "75GiB", "cpu": "100GiB"}
    assert Settings(max_memory='{"0": "75GiB"}').max_memory == {"0": "75GiB"}
    assert str(settings.hub_cache_dir) == "/workspace/models/hub"
    assert settings.model == "FreedomIntelligence/ShizhenGPT-32B-VL"
    assert "b" not in repr(settings.api_keys)


@pytest.mark.parametrize(
    ("env", "args", "named"),
    [
        ({"SHIZHEN_DTYPE": "int8"}, [], "dtype (SHIZHEN_DTYPE / --dtype)"),
        ({}, ["--port", "70000"], "port (SHIZHEN_PORT or PORT / --port)"),
        ({"SHIZHEN_MAX_MEMORY": '{"0": "lots"}'}, [], "max_memory"),
        ({"SHIZHEN_DEFAULT_MAX_TOKENS": "9000"}, [], "default_max_tokens must not exceed max_tokens_limit"),
        ({}, ["--kv-cache-tokens", "4096"], "kv_cache_tokens must hold one max_context_length sequence"),
    ],
)
def test_invalid_settings_fail_at_start_naming_the_setting(env, args, named):
    process = serve_cli(args, env)
    output, _ = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "invalid settings" in output and named in output


def test_serve_demo_from_the_command_line(tmp_path):
    port = free_port()
    process = serve_cli(["--demo", "--port", str(port), "--host", "127.0.0.1"], {"SHIZHEN_CACHE_DIR": str(tmp_path)})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health")
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.2)
        assert health.json()["random_test_model"] is True
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
        assert models[0]["id"] == "shizhen-demo-tiny-random" and models[0]["random_test_model"] is True
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                           json={"messages": [USER], "max_tokens": 3}, timeout=30)
        assert reply.status_code == 200
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert "RANDOM TEST MODEL" in output
