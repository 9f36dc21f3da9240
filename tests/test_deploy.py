"""The RunPod kit: the real `runpod` SDK and the kit against a stand-in that validates every operation against
RunPod's GraphQL schema, a clean clone of this repository as the checkout it ships, and the real server for
readiness, examples and auto-stop. (The pod's own start script is tested in test_pod.py.)"""

from __future__ import annotations

import asyncio
import base64
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import GIT_URL, created_pod, head

from shizhen.api.context import Activity
from shizhen.cli import main
from shizhen.deploy.idle import PodAutoStop

USER = {"role": "user", "content": "舌"}
REPO = Path(__file__).resolve().parent.parent
START_SCRIPT = REPO / "src" / "shizhen" / "deploy" / "start_pod.sh"


def test_up_creates_volume_and_pod_with_the_design_spec_and_waits_for_health(runpod_api, deploy_env, checkout,
                                                                               server, capsys):
    deploy_env.setenv("SHIZHEN_DEPLOY_PROXY_URL", server.url)
    assert main(["deploy", "up"]) == 0
    assert runpod_api.inputs["createNetworkVolume"] == [{"name": "shizhen-models", "size": 100,
                                                         "dataCenterId": "EU-RO-1"}]
    spec, env = created_pod(runpod_api)
    assert spec["gpuTypeId"] == "NVIDIA A100 80GB PCIe" and spec["gpuCount"] == 1 and spec["cloudType"] == "SECURE"
    assert spec["containerDiskInGb"] == 50 and spec["networkVolumeId"] == "vol1" and spec["dataCenterId"] == "EU-RO-1"
    assert spec["ports"] == "8000/http,22/tcp" and spec["volumeMountPath"] == "/workspace" and spec["startSsh"]
    assert spec["imageName"] == "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"
    assert spec["allowedCudaVersions"] == ["13.0"]  # what requirements.txt's torch wheels need
    assert env["SHIZHEN_MODEL"] == "FreedomIntelligence/ShizhenGPT-32B-VL"
    assert env["HF_HOME"] == env["SHIZHEN_CACHE_DIR"] == "/workspace/models"
    assert env["SHIZHEN_API_KEYS"] == "clinic-key" and env["SHIZHEN_CORS_ALLOWED_ORIGINS"] == "https://clinic.example"
    assert env["SHIZHEN_MAX_MEMORY"] == "0=75GiB" and env["SHIZHEN_REQUIRE_GPU"] == "true"
    assert env["SHIZHEN_PACKAGE"] == f"git+{GIT_URL}@{head(checkout)}"  # this checkout, never a bare name
    assert env["SHIZHEN_IDLE_STOP_SECONDS"] == "3600" and env["SHIZHEN_MAX_UPTIME_HOURS"] == "12"  # cost guards
    assert base64.b64decode(env["SHIZHEN_REQUIREMENTS_B64"]) == (checkout / "requirements.txt").read_bytes()
    assert shlex.split(spec["dockerArgs"])[:2] == ["bash", "-c"]
    script = re.search(r"echo (\S+) \| base64 -d", spec["dockerArgs"])[1]
    assert base64.b64decode(script) == START_SCRIPT.read_bytes()
    out = capsys.readouterr()
    assert f"endpoint: {server.url}/v1" in out.out and "curl " in out.out and "openai.OpenAI" in out.out
    assert runpod_api.api_key not in out.out + out.err and "clinic-key" not in out.out + out.err
    # a second `up` with the same settings changes nothing
    assert main(["deploy", "up"]) == 0
    assert "already runs this release" in capsys.readouterr().out
    assert len(runpod_api.inputs["podFindAndDeployOnDemand"]) == 1 and "podEditJob" not in runpod_api.inputs
    assert len(runpod_api.inputs["createNetworkVolume"]) == 1


def test_up_with_changed_settings_updates_the_pod_or_recreates_it_on_the_same_volume(runpod_api, deploy_env, server,
                                                                                      capsys):
    deploy_env.setenv("SHIZHEN_DEPLOY_PROXY_URL", server.url)
    assert main(["deploy", "up"]) == 0
    deploy_env.setenv("SHIZHEN_API_KEYS", "rotated-key")  # the old key leaked
    deploy_env.setenv("SHIZHEN_IDLE_STOP_SECONDS", "0")  # the cost guard switched off on purpose
    capsys.readouterr()
    assert main(["deploy", "up"]) == 0
    out = capsys.readouterr().out
    assert "SHIZHEN_API_KEYS changed" in out and "SHIZHEN_IDLE_STOP_SECONDS removed" in out
    assert "rotated-key" not in out and "clinic-key" not in out
    [edit] = runpod_api.inputs["podEditJob"]
    assert edit["podId"] == "pod1"
    assert {item["key"]: item["value"] for item in edit["env"]}["SHIZHEN_API_KEYS"] == "rotated-key"
    assert runpod_api.pods["pod1"]["env"]["SHIZHEN_API_KEYS"] == "rotated-key"
    assert "SHIZHEN_IDLE_STOP_SECONDS" not in runpod_api.pods["pod1"]["env"]
    # another GPU cannot be edited in: a new pod on the same volume
    deploy_env.setenv("SHIZHEN_DEPLOY_GPU_TYPE", "NVIDIA H100 80GB HBM3")
    assert main(["deploy", "up"]) == 0
    assert "terminating it and creating a new one on the same volume" in capsys.readouterr().out
    assert list(runpod_api.pods) == ["pod2"] and runpod_api.pods["pod2"]["gpuTypeId"] == "NVIDIA H100 80GB HBM3"
    assert runpod_api.pods["pod2"]["networkVolumeId"] == "vol1" and len(runpod_api.volumes) == 1


def test_a_stopped_pod_with_changed_settings_is_updated_then_resumed(runpod_api, deploy_env, server):
    deploy_env.setenv("SHIZHEN_DEPLOY_PROXY_URL", server.url)
    assert main(["deploy", "up"]) == 0
    assert main(["deploy", "stop"]) == 0
    deploy_env.setenv("SHIZHEN_API_KEYS", "rotated-key")
    assert main(["deploy", "up"]) == 0
    assert runpod_api.pods["pod1"]["desiredStatus"] == "RUNNING"
    assert runpod_api.pods["pod1"]["env"]["SHIZHEN_API_KEYS"] == "rotated-key"


def test_quotes_and_backslashes_in_settings_reach_the_pod_intact(runpod_api, deploy_env, server):
    """The SDK writes env values into the GraphQL mutation as they are; the kit escapes them first."""
    deploy_env.setenv("SHIZHEN_DEPLOY_PROXY_URL", server.url)
    deploy_env.setenv("SHIZHEN_API_KEYS", 'k"ey\\1,second')
    deploy_env.setenv("SHIZHEN_DEPLOY_POD_NAME", 'clinic "east"')
    assert main(["deploy", "up"]) == 0
    spec, env = created_pod(runpod_api)
    assert env["SHIZHEN_API_KEYS"] == 'k"ey\\1,second' and spec["name"] == 'clinic "east"'


def test_uncommitted_changes_and_unpushed_commits_are_refused(runpod_api, deploy_env, checkout, capsys):
    (checkout / "src" / "shizhen" / "local_patch.py").write_text("x = 1\n")
    assert main(["deploy", "up"]) == 1
    assert "uncommitted changes (src/shizhen/local_patch.py)" in capsys.readouterr().err
    git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@example"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "--quiet", "-m", "local"], check=True)
    assert main(["deploy", "up"]) == 1
    assert f"commit {head(checkout)[:12]} is on no remote branch: push it first" in capsys.readouterr().err
    assert "podFindAndDeployOnDemand" not in runpod_api.inputs


def test_the_wheel_route_needs_the_s3_keys(runpod_api, deploy_env, capsys):
    deploy_env.delenv("SHIZHEN_DEPLOY_GIT_URL")
    assert main(["deploy", "up"]) == 1
    assert "SHIZHEN_DEPLOY_S3_ACCESS_KEY_ID" in capsys.readouterr().err
    assert "podFindAndDeployOnDemand" not in runpod_api.inputs


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


def test_up_stops_at_the_first_failed_health_with_the_reason(runpod_api, deploy_env, start_server, tmp_path, capsys):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    failed = start_server(wait=False, model=str(broken))
    deploy_env.setenv("SHIZHEN_DEPLOY_PROXY_URL", failed.url)
    deploy_env.setenv("SHIZHEN_DEPLOY_READY_TIMEOUT_SECONDS", "60")
    started = time.monotonic()
    assert main(["deploy", "up"]) == 1
    assert time.monotonic() - started < 30, "it should not wait for the timeout"
    err = capsys.readouterr().err
    assert "failed to start" in err and "config.json" in err and "still running" in err


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


def test_the_printed_examples_work_pasted_into_the_shell(runpod_api, deploy_env, start_server, capsys):
    served = start_server(api_keys=["first-key", "second-key"], served_model_name="shizhen-clinic")
    deploy_env.setenv("SHIZHEN_DEPLOY_PROXY_URL", served.url)
    deploy_env.setenv("SHIZHEN_API_KEYS", "first-key,second-key")
    deploy_env.setenv("SHIZHEN_SERVED_MODEL_NAME", "shizhen-clinic")
    assert main(["deploy", "up"]) == 0
    out = capsys.readouterr().out
    curl = out[out.index("curl "):out.index("\npython3 ")]
    python = out[out.index("python3 -c"):].strip()
    shell_env = {"SHIZHEN_API_KEYS": "first-key,second-key", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    curl = curl.replace("curl ", "curl --fail-with-body --silent ", 1)
    answered = subprocess.run(["bash", "-c", curl], env=shell_env, capture_output=True, text=True, timeout=60)
    assert answered.returncode == 0 and '"object":"chat.completion"' in answered.stdout, answered.stdout
    answered = subprocess.run(["bash", "-c", python], env=shell_env, capture_output=True, text=True, timeout=60)
    assert answered.returncode == 0, answered.stderr


def test_status_stop_start_and_resume_with_zero_gpus(runpod_api, deploy_env, server, capsys):
    deploy_env.setenv("SHIZHEN_DEPLOY_PROXY_URL", server.url)
    assert main(["deploy", "up"]) == 0
    assert main(["deploy", "status"]) == 0
    assert "RUNNING" in capsys.readouterr().out
    assert main(["deploy", "stop"]) == 0 and runpod_api.pods["pod1"]["desiredStatus"] == "EXITED"
    runpod_api.no_gpus_on_resume = True
    assert main(["deploy", "start"]) == 2
    assert "zero GPUs" in capsys.readouterr().err and "pod1" in runpod_api.pods
    runpod_api.no_gpus_on_resume = False
    assert main(["deploy", "start", "--recreate"]) == 0
    assert "pod1" in runpod_api.pods  # resumed: nothing to recreate
    runpod_api.no_gpus_on_resume = True
    assert main(["deploy", "stop"]) == 0 and main(["deploy", "start", "--recreate"]) == 0
    assert "pod1" not in runpod_api.pods and "pod2" in runpod_api.pods
    assert len(runpod_api.volumes) == 1  # the same volume, with the cached model
    assert main(["deploy", "down"]) == 0 and not runpod_api.pods
    assert "kept" in capsys.readouterr().out


def test_down_deletes_the_volume_with_or_without_a_pod(runpod_api, deploy_env, server, capsys):
    deploy_env.setenv("SHIZHEN_DEPLOY_PROXY_URL", server.url)
    assert main(["deploy", "up"]) == 0
    assert main(["deploy", "down"]) == 0 and runpod_api.volumes
    assert main(["deploy", "down", "--delete-volume"]) == 0  # the pod is already gone
    assert runpod_api.inputs["deleteNetworkVolume"] == [{"id": "vol1"}] and not runpod_api.volumes
    assert main(["deploy", "up"]) == 0
    assert main(["deploy", "down", "--delete-volume"]) == 0  # pod and volume in one go
    assert not runpod_api.pods and not runpod_api.volumes
    assert main(["deploy", "down"]) == 1
    assert "no pod named 'shizhen'" in capsys.readouterr().err


def test_logs_come_from_runpods_logs_api(runpod_api, deploy_env, server, capsys):
    deploy_env.setenv("SHIZHEN_DEPLOY_PROXY_URL", server.url)
    assert main(["deploy", "up"]) == 0
    runpod_api.logs["pod1"] = ["[start_pod] installing", "[start_pod] starting the server", "model ready"]
    capsys.readouterr()
    assert main(["deploy", "logs", "--tail", "2"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == ["[start_pod] starting the server", "model ready"]
    assert "/workspace/shizhen/logs/" in out.err


def test_deploy_script_without_an_action_prints_usage_and_creates_nothing(runpod_api):
    result = subprocess.run(["bash", str(REPO / "deploy_runpod.sh")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage:" in result.stderr
    assert not runpod_api.queries


def test_cost_table_from_settings_and_from_the_api(runpod_api, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["cost"]) == 0
    out = capsys.readouterr().out
    assert "$1.89/h (RunPod API)" in out and "container disk 50 GB" in out
    # GPU 112 h x 1.89; container disk 50 GB x $0.10/GB-month for 112 of 720 h; volume 100 GB x $0.07 for 14 of 30 days
    assert re.search(r"testing, 8 h/day for two weeks\s+211\.68\s+0\.78\s+3\.27\s+215\.72", out)
    assert re.search(r"24/7, one month\s+1360\.80\s+5\.00\s+7\.00\s+1372\.80", out)
    monkeypatch.delenv("RUNPOD_API_KEY")
    monkeypatch.setattr("runpod.api_key", None)
    assert main(["cost"]) == 0
    assert "$1.64/h (settings)" in capsys.readouterr().out


def test_idle_pod_stops_itself_but_never_mid_stream(runpod_api, monkeypatch, start_server):
    monkeypatch.setenv("RUNPOD_POD_ID", "pod7")
    runpod_api.pods["pod7"] = {"id": "pod7", "name": "shizhen", "desiredStatus": "RUNNING"}
    server = start_server(idle_stop_seconds=0.8, idle_check_seconds=0.1, require_gpu=False)
    with server.client() as http:
        started = time.monotonic()
        with http.stream("POST", "/v1/chat/completions", json={"messages": [USER], "max_tokens": 3000,
                                                               "ignore_eos": True, "stream": True}) as response:
            for _ in response.iter_lines():
                pass
        streamed_for = time.monotonic() - started
    assert streamed_for > 1.2, "the stream should outlast the idle window"
    assert "podStop" not in runpod_api.inputs, "no stop while a request runs"
    deadline = time.monotonic() + 3
    while "podStop" not in runpod_api.inputs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runpod_api.inputs["podStop"] == [{"podId": "pod7"}]
    assert time.monotonic() - started - streamed_for >= 0.7


def test_the_idle_clock_starts_when_the_model_serves():
    """Loading (a first start downloads 64 GB) is not idleness: the pod must not stop itself before it ever served."""
    stops, serving = [], False
    auto_stop = PodAutoStop(Activity(), lambda: serving, idle_seconds=0.3, max_uptime_seconds=None,
                            check_seconds=0.05, stop_pod=lambda: stops.append(time.monotonic()))

    async def load_then_serve():
        nonlocal serving
        task = asyncio.create_task(auto_stop.run())
        await asyncio.sleep(0.6)
        assert not stops, "stopped while loading"
        serving, ready = True, time.monotonic()
        await asyncio.wait_for(task, timeout=30)
        return ready

    ready = asyncio.run(load_then_serve())
    assert len(stops) == 1 and stops[0] - ready >= 0.3


def test_a_gpu_model_never_loads_on_the_cpu(start_server, monkeypatch, caplog):
    """On a pod (RUNPOD_POD_ID) the GPU is required by default: /health says why, nothing is loaded."""
    monkeypatch.setenv("RUNPOD_POD_ID", "pod7")
    refused = start_server(wait=False)
    with pytest.raises(RuntimeError) as failed:
        refused.wait_ready()
    error = failed.value.args[0]["error"]
    assert error.startswith("NoUsableGpu: no usable GPU") and "SHIZHEN_REQUIRE_GPU=false" in error
    assert "no usable GPU" in caplog.text
