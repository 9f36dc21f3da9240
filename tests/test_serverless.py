"""RunPod Serverless: the kit against the schema-validating RunPod stand-in, the worker contract (/ping, PORT,
PORT_HEALTH), and real workers behind a stand-in of RunPod's load balancer: cold start, scale-out, scale to zero."""

from __future__ import annotations

import re
import subprocess
import threading
import time

import openai
import pytest
from conftest import GIT_URL, head, hold_loading
from serverless_standin import StandInLoadBalancer

from shizhen.cli import main

USER = {"role": "user", "content": "舌"}


def endpoint_inputs(runpod_api) -> tuple[dict, dict, dict[str, str]]:
    """The last saveEndpoint and saveTemplate inputs, and the template's env."""
    template = runpod_api.inputs["saveTemplate"][-1]
    return (runpod_api.inputs["saveEndpoint"][-1], template,
            {item["key"]: item["value"] for item in template["env"]})


def test_up_serverless_creates_template_and_lb_endpoint_on_the_pods_volume(runpod_api, server, deploy_env, checkout,
                                                                          capsys):
    """(`server` comes before deploy_env: like a worker, it has no SHIZHEN_API_KEYS.)"""
    deploy_env.setenv("SHIZHEN_DEPLOY_PROXY_URL", server.url)
    deploy_env.setenv("SHIZHEN_DEPLOY_SERVERLESS_URL", server.url)
    deploy_env.setenv("SHIZHEN_SERVED_MODEL_NAME", server.settings.model_name)
    assert main(["deploy", "up"]) == 0  # a pod first: the endpoint uses its volume (and its downloaded model)
    capsys.readouterr()
    assert main(["deploy", "up", "--serverless"]) == 0
    endpoint, template, env = endpoint_inputs(runpod_api)
    assert template["isServerless"] is True and template["name"] == "shizhen-worker"
    assert template["ports"] == "8000/http" and template["volumeInGb"] == 0
    assert "base64 -d > /tmp/start_pod.sh" in template["dockerArgs"]  # the same start script, as PID 1
    assert env["WORKSPACE"] == "/runpod-volume"
    assert env["HF_HOME"] == env["SHIZHEN_CACHE_DIR"] == "/runpod-volume/models"
    assert env["SHIZHEN_PACKAGE"] == f"git+{GIT_URL}@{head(checkout)}" and env["PORT"] == "8000"
    assert env["SHIZHEN_STOP_POD_ON_FAILURE"] == "0" and "SHIZHEN_API_KEYS" not in env  # RunPod's key guards it
    assert "SHIZHEN_IDLE_STOP_SECONDS" not in env  # RunPod scales workers to zero itself
    assert endpoint["type"] == "LB" and endpoint["gpuIds"] == "AMPERE_80,ADA_80_PRO"
    assert endpoint["workersMin"] == 0 and endpoint["workersMax"] == 2 and endpoint["idleTimeout"] == 600
    assert endpoint["networkVolumeId"] == "vol1" and endpoint["flashBootType"] == "FLASHBOOT"
    assert endpoint["templateId"] == "tpl1" and len(runpod_api.volumes) == 1
    out = capsys.readouterr()
    assert "created endpoint ep1" in out.out and "SHIZHEN_API_KEYS are not sent" in out.err
    # the printed examples work pasted into a shell that has RUNPOD_API_KEY
    curl = out.out[out.out.index("curl "):out.out.index("\npython3 ")].replace("curl ", "curl --fail-with-body -s ", 1)
    answered = subprocess.run(["bash", "-c", curl], env={"RUNPOD_API_KEY": runpod_api.api_key, "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=60)
    assert answered.returncode == 0 and '"object":"chat.completion"' in answered.stdout
    # again, with other settings: the same template and endpoint, updated in place
    deploy_env.setenv("SHIZHEN_DEPLOY_WORKERS_MAX", "4")
    assert main(["deploy", "up", "--serverless"]) == 0
    endpoint, template, _ = endpoint_inputs(runpod_api)
    assert endpoint["id"] == "ep1" and endpoint["workersMax"] == 4 and template["id"] == "tpl1"
    assert list(runpod_api.endpoints) == ["ep1"] and list(runpod_api.templates) == ["tpl1"]
    assert "updated endpoint ep1" in capsys.readouterr().out


def test_status_stop_and_down_cover_the_endpoint(runpod_api, deploy_env, server, capsys):
    deploy_env.setenv("SHIZHEN_DEPLOY_SERVERLESS_URL", server.url)
    assert main(["deploy", "up", "--serverless"]) == 0
    assert main(["deploy", "status", "--serverless"]) == 0
    assert "endpoint ep1 (shizhen): 0-2 workers on AMPERE_80,ADA_80_PRO" in capsys.readouterr().out
    assert main(["deploy", "stop", "--serverless"]) == 0
    assert runpod_api.endpoints["ep1"]["workersMax"] == 0 and runpod_api.endpoints["ep1"]["workersMin"] == 0
    assert main(["deploy", "down", "--serverless"]) == 0
    assert not runpod_api.endpoints and not runpod_api.templates and runpod_api.volumes  # the volume stays
    assert main(["deploy", "up", "--serverless"]) == 0
    assert main(["deploy", "down", "--serverless", "--delete-volume"]) == 0  # scaled to 0 first, as RunPod needs
    assert not runpod_api.endpoints and not runpod_api.volumes
    assert main(["deploy", "status", "--serverless"]) == 1


def test_ping_is_the_worker_contract(start_server, tiny_checkpoint, tmp_path):
    folder, release = hold_loading(tiny_checkpoint, tmp_path / "held")
    server = start_server(wait=False, model=str(folder))
    with server.client() as http:
        assert http.get("/ping").status_code == 204  # initializing: no traffic yet
        release.set()
        server.wait_ready()
        assert http.get("/ping").status_code == 200
        server.context.chat.draining = True
        assert http.get("/ping").status_code == 503  # draining: not 200, so no new traffic


def test_cost_compares_pod_and_serverless(runpod_api, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["cost", "--consultations-per-day", "20"]) == 0
    out = capsys.readouterr().out
    assert "each cold start 240 s" in out
    # 20 consultations over 8 h are 24 min apart, beyond cold start + idle stop: each wakes a worker for
    # 240 + 30 + 600 s; 14 days of that is 67.7 worker-hours at $2.736/h, plus 14 days of the volume
    assert re.search(r"testing, 8 h/day for two weeks\s+67\.7\s+185\.14\s+3\.27\s+188\.40\s+215\.72", out)
    # 24/7 at 20 a day (72 min apart): also one wake each
    assert re.search(r"24/7, one month\s+145\.0\s+396\.72\s+7\.00\s+403\.72\s+1372\.80", out)


@pytest.mark.timeout(420)
def test_workers_start_on_demand_scale_out_and_scale_to_zero(tiny_checkpoint, runpod_api):
    balancer = StandInLoadBalancer(str(tiny_checkpoint), runpod_api.api_key, workers_max=2, requests_per_worker=2,
                                   idle_timeout=3)
    client = openai.OpenAI(base_url=f"{balancer.url}/v1", api_key=runpod_api.api_key, timeout=300, max_retries=0)
    try:
        cold = client.chat.completions.create(model=client.models.list().data[0].id, messages=[USER], max_tokens=4)
        assert cold.choices[0].finish_reason in ("stop", "length") and balancer.started == 1  # through a cold start
        results: list = [None] * 6

        def stream(i: int) -> None:
            chunks = client.chat.completions.create(model=cold.model, messages=[USER], max_tokens=300, stream=True,
                                                    extra_body={"ignore_eos": True})
            results[i] = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert results == [["length"]] * 6  # every accepted request completed
        assert balancer.started == 2  # six streams at two per worker: a second worker, capped at workers_max
        deadline = time.monotonic() + 60
        while (balancer.workers or len(balancer.exit_codes) < 2) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not balancer.workers and balancer.exit_codes == [0, 0]  # scaled to zero, each drained and exited 0
    finally:
        balancer.close()
