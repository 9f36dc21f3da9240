"""The RunPod kit: the real `runpod` SDK against a stand-in API, the real server for readiness and auto-stop,
and the pod's start script in a fake /workspace."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from runpod_standin import StandInRunPod

from shizhen.cli import main

USER = {"role": "user", "content": "舌"}
START_SCRIPT = Path(__file__).resolve().parent.parent / "src" / "shizhen" / "deploy" / "start_pod.sh"


@pytest.fixture
def runpod_api(monkeypatch):
    stand_in = StandInRunPod()
    monkeypatch.setenv("RUNPOD_API_BASE_URL", stand_in.url)
    monkeypatch.setenv("RUNPOD_API_KEY", stand_in.api_key)
    yield stand_in
    stand_in.close()


@pytest.fixture
def deploy_env(monkeypatch, tmp_path):
    """What a person sets before `deploy up`; the proxy address points at a local server in each test."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name, value in {"SHIZHEN_DEPLOY_DATA_CENTER": "EU-RO-1", "SHIZHEN_DEPLOY_POLL_SECONDS": "0.05",
                        "SHIZHEN_API_KEYS": "clinic-key", "SHIZHEN_CORS_ALLOWED_ORIGINS": "https://clinic.example",
                        "SHIZHEN_DEPLOY_READY_TIMEOUT_SECONDS": "20"}.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_up_creates_volume_and_pod_with_the_seed_spec_and_waits_for_health(runpod_api, deploy_env, server, capsys):
    deploy_env.setenv("SHIZHEN_DEPLOY_PROXY_URL", server.url)
    assert main(["deploy", "up"]) == 0
    [volume] = runpod_api.calls("createNetworkVolume")
    assert 'size: 100' in volume and 'dataCenterId: "EU-RO-1"' in volume and 'name: "shizhen-models"' in volume
    [pod] = runpod_api.calls("podFindAndDeployOnDemand")
    for field in ('gpuTypeId: "NVIDIA A100 80GB PCIe"', "cloudType: SECURE", "containerDiskInGb: 50",
                  'networkVolumeId: "vol1"', 'dataCenterId: "EU-RO-1"', 'ports: "8000/http"',
                  'volumeMountPath: "/workspace"', 'imageName: "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"',
                  "gpuCount: 1"):
        assert field in pod, field
    env = _pod_env(pod)
    assert env["SHIZHEN_MODEL"] == "FreedomIntelligence/ShizhenGPT-32B-VL"
    assert env["HF_HOME"] == env["SHIZHEN_CACHE_DIR"] == "/workspace/models"
    assert env["SHIZHEN_API_KEYS"] == "clinic-key" and env["SHIZHEN_CORS_ALLOWED_ORIGINS"] == "https://clinic.example"
    assert env["SHIZHEN_MAX_MEMORY"] == "0=75GiB"
    script = re.search(r"echo (\S+) \| base64 -d", pod)[1]
    assert base64.b64decode(script) == START_SCRIPT.read_bytes()
    out = capsys.readouterr()
    assert f"endpoint: {server.url}/v1" in out.out and "curl " in out.out and "openai.OpenAI" in out.out
    assert runpod_api.api_key not in out.out + out.err
    # a second `up` reuses the pod and the volume
    assert main(["deploy", "up"]) == 0
    assert len(runpod_api.calls("podFindAndDeployOnDemand")) == 1 and len(runpod_api.calls("createNetworkVolume")) == 1


def _pod_env(mutation: str) -> dict[str, str]:
    """The env of a pod-creating mutation, its GraphQL string literals decoded."""
    return {key: json.loads(f'"{value}"')
            for key, value in re.findall(r'\{ key: "([^"]+)", value: "((?:[^"\\]|\\.)*)" \}', mutation)}


def test_quotes_and_backslashes_in_settings_reach_the_pod_intact(runpod_api, deploy_env, server):
    """The SDK writes env values into the GraphQL mutation as they are; the kit escapes them first."""
    deploy_env.setenv("SHIZHEN_DEPLOY_PROXY_URL", server.url)
    deploy_env.setenv("SHIZHEN_API_KEYS", 'k"ey\\1,second')
    assert main(["deploy", "up"]) == 0
    [pod] = runpod_api.calls("podFindAndDeployOnDemand")
    assert _pod_env(pod)["SHIZHEN_API_KEYS"] == 'k"ey\\1,second'


def test_a_bad_api_key_is_a_clear_error(runpod_api, deploy_env, capsys):
    deploy_env.setenv("RUNPOD_API_KEY", "wrong")
    assert main(["deploy", "up"]) == 1
    assert "refused the API key" in capsys.readouterr().err


def test_no_capacity_suggests_other_gpus(runpod_api, deploy_env, capsys):
    runpod_api.no_capacity = True
    assert main(["deploy", "up"]) == 1
    err = capsys.readouterr().err
    assert "no NVIDIA A100 80GB PCIe is free in EU-RO-1" in err
    assert "NVIDIA H100 80GB HBM3" in err and "NVIDIA GeForce RTX 4090" in err and "RTX A4000" not in err


def test_volume_in_another_data_centre_is_refused(runpod_api, deploy_env, capsys):
    runpod_api.volumes.append({"id": "vol9", "name": "shizhen-models", "size": 100, "dataCenterId": "US-KS-2"})
    assert main(["deploy", "up"]) == 1
    assert "is in data centre US-KS-2, not EU-RO-1" in capsys.readouterr().err


def test_a_pod_that_never_gets_healthy_times_out_with_the_last_answer(runpod_api, deploy_env, start_server,
                                                                       tiny_checkpoint, tmp_path, capsys):
    from conftest import hold_loading

    folder, release = hold_loading(tiny_checkpoint, tmp_path / "held")
    try:
        loading = start_server(wait=False, model=str(folder))
        deploy_env.setenv("SHIZHEN_DEPLOY_PROXY_URL", loading.url)
        deploy_env.setenv("SHIZHEN_DEPLOY_READY_TIMEOUT_SECONDS", "0.5")
        assert main(["deploy", "up"]) == 1
        err = capsys.readouterr().err
        assert "did not become healthy within 0.5 s" in err and "'status': 'loading'" in err
    finally:
        release.set()


def test_status_stop_start_and_resume_with_zero_gpus(runpod_api, deploy_env, server, capsys):
    deploy_env.setenv("SHIZHEN_DEPLOY_PROXY_URL", server.url)
    assert main(["deploy", "up"]) == 0
    assert main(["deploy", "status"]) == 0
    assert "RUNNING" in capsys.readouterr().out
    assert main(["deploy", "stop"]) == 0 and runpod_api.pods["pod1"]["desiredStatus"] == "EXITED"
    runpod_api.no_gpus_on_resume = True
    assert main(["deploy", "start"]) == 2
    assert "zero GPUs" in capsys.readouterr().err and "pod1" in runpod_api.pods
    assert main(["deploy", "start", "--recreate"]) == 0
    assert "pod1" not in runpod_api.pods and "pod2" in runpod_api.pods
    assert len(runpod_api.calls("createNetworkVolume")) == 1  # the same volume, with the cached model
    assert main(["deploy", "down"]) == 0 and not runpod_api.pods
    assert "kept" in capsys.readouterr().out


def test_cost_table_from_settings_and_from_the_api(runpod_api, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["cost"]) == 0
    out = capsys.readouterr().out
    assert "$1.89/h (RunPod API)" in out
    assert re.search(r"testing, 8 h/day for two weeks\s+211\.68\s+3\.50\s+215\.18", out)
    assert re.search(r"24/7, one month\s+1360\.80\s+7\.00\s+1367\.80", out)
    monkeypatch.delenv("RUNPOD_API_KEY")
    monkeypatch.setattr("runpod.api_key", None)
    assert main(["cost"]) == 0
    assert "$1.64/h (settings)" in capsys.readouterr().out


def test_idle_pod_stops_itself_but_never_mid_stream(runpod_api, monkeypatch, start_server):
    monkeypatch.setenv("RUNPOD_POD_ID", "pod7")
    runpod_api.pods["pod7"] = {"id": "pod7", "name": "shizhen", "desiredStatus": "RUNNING"}
    server = start_server(idle_stop_seconds=0.8, idle_check_seconds=0.1)
    server.engine.loaded.stop_token_ids = frozenset()
    with server.client() as http:
        started = time.monotonic()
        with http.stream("POST", "/v1/chat/completions", json={"messages": [USER], "max_tokens": 3000,
                                                               "stream": True}) as response:
            for _ in response.iter_lines():
                pass
        streamed_for = time.monotonic() - started
    assert streamed_for > 1.2, "the stream should outlast the idle window"
    assert not runpod_api.calls("podStop"), "no stop while a request runs"
    deadline = time.monotonic() + 3
    while not runpod_api.calls("podStop") and time.monotonic() < deadline:
        time.sleep(0.05)
    [stop] = runpod_api.calls("podStop")
    assert 'podId: "pod7"' in stop
    assert time.monotonic() - started - streamed_for >= 0.7


def test_start_script_installs_once_restarts_with_backoff_and_logs_to_the_volume(tmp_path):
    workspace = tmp_path / "workspace"
    calls = tmp_path / "calls.log"
    fake_pip = tmp_path / "pip"
    fake_pip.write_text(f"#!/bin/sh\necho pip \"$@\" >> {calls}\n")
    fake_server = tmp_path / "serve"
    # crashes twice, then stops cleanly (as after SIGTERM); says where the model and kernel caches are
    fake_server.write_text(f"#!/bin/sh\necho serve HF_HOME=$HF_HOME TRITON_CACHE_DIR=$TRITON_CACHE_DIR >> {calls}\n"
                           f"n=$(grep -c '^serve' {calls}); [ $n -ge 3 ] && exit 0; exit 1\n")
    fake_pip.chmod(0o755)
    fake_server.chmod(0o755)
    env = {**os.environ, "WORKSPACE": str(workspace), "SHIZHEN_PIP": str(fake_pip), "SHIZHEN_SERVE_CMD": str(fake_server),
           "SHIZHEN_RESTART_DELAY": "0.1", "SHIZHEN_PACKAGE": "shizhen-serve==0.1.0",
           "SHIZHEN_REQUIREMENTS_B64": base64.b64encode(b"torch==2.14.1\n").decode()}
    for _ in range(2):
        result = subprocess.run(["bash", str(START_SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
    lines = calls.read_text().splitlines()
    assert lines.count(f"pip install -r {workspace}/shizhen/requirements.txt shizhen-serve==0.1.0") == 1  # once
    assert (workspace / "shizhen" / "requirements.txt").read_text() == "torch==2.14.1\n"
    assert f"serve HF_HOME={workspace}/models TRITON_CACHE_DIR={workspace}/shizhen/triton-cache" in lines
    supervisor = (workspace / "shizhen" / "logs" / "supervisor.log").read_text()
    assert "exited with code 1; restarting in 0.1s" in supervisor and "restarting in 0.2s" in supervisor
    assert "stopped cleanly" in supervisor
