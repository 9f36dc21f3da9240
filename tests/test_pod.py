"""The pod, played on this machine: what `deploy up` ships, the start script as the container's PID 1 (its own PID
namespace, a temporary folder bind-mounted at /workspace), RunPod's S3 API as a local S3 server (moto), the tiny
checkpoint as the model, `/health` and a stream through a local proxy, SIGTERM to PID 1."""

from __future__ import annotations

import base64
import json
import os
import shlex
import signal
import site
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import httpx
import pytest
from conftest import created_pod, free_port
from local_http import TcpProxy
from moto.server import ThreadedMotoServer

from shizhen.cli import main

START_SCRIPT = Path(__file__).resolve().parent.parent / "src" / "shizhen" / "deploy" / "start_pod.sh"
S3_KEYS = {"aws_access_key_id": "user_test", "aws_secret_access_key": "rps_test"}


@pytest.fixture
def s3_volumes(runpod_api):
    """RunPod's S3-compatible API: one bucket per network volume, made when the volume is."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}/", region_name="EU-RO-1", **S3_KEYS)
    runpod_api.on_volume_created.append(lambda volume: s3.create_bucket(
        Bucket=volume["id"], CreateBucketConfiguration={"LocationConstraint": volume["dataCenterId"]}))
    yield s3
    server.stop()


def volume_contents(s3, volume_id: str, workspace: Path) -> list[str]:
    """What the S3 API wrote to the volume, laid out as the pod sees it under /workspace."""
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=volume_id).get("Contents", [])]
    for key in keys:
        (workspace / key).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(volume_id, key, str(workspace / key))
    return keys


def venv_sharing_this_environment(venv: Path) -> None:
    """The pod's venv on the volume, seeing this test environment's packages, so that installing the pinned
    requirements finds them all already there (no torch download); the shipped wheel installs into it for real."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    [packages] = venv.glob("lib/python3*/site-packages")
    (packages / "test-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")


def pid_1_of(namespace: subprocess.Popen) -> int:
    """The PID (outside) of the first process in the PID namespace `unshare --fork` made."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/{namespace.pid}/task/{namespace.pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise TimeoutError("unshare started no process")


@pytest.mark.timeout(400)
def test_the_pod_runs_this_checkout_as_pid_1_and_drains_on_sigterm(runpod_api, deploy_env, s3_volumes, checkout,
                                                                   tiny_checkpoint, tmp_path):
    pod_port = free_port()
    proxy = TcpProxy(pod_port)
    endpoint = s3_volumes.meta.endpoint_url
    deploy_env.delenv("SHIZHEN_DEPLOY_GIT_URL")  # the default route: a wheel on the volume through the S3 API
    for name, value in {"SHIZHEN_DEPLOY_S3_ACCESS_KEY_ID": S3_KEYS["aws_access_key_id"],
                        "SHIZHEN_DEPLOY_S3_SECRET_ACCESS_KEY": S3_KEYS["aws_secret_access_key"],
                        "SHIZHEN_DEPLOY_S3_ENDPOINT_URL": endpoint, "SHIZHEN_MODEL": str(tiny_checkpoint),
                        "SHIZHEN_DEPLOY_PORT": str(pod_port), "SHIZHEN_DEPLOY_PROXY_URL": proxy.url,
                        "SHIZHEN_DEPLOY_READY_TIMEOUT_SECONDS": "240"}.items():
        deploy_env.setenv(name, value)
    result: list[int] = []
    deploying = threading.Thread(target=lambda: result.append(main(["deploy", "up"])))
    deploying.start()
    deadline = time.monotonic() + 120
    while "podFindAndDeployOnDemand" not in runpod_api.inputs:
        assert deploying.is_alive() and time.monotonic() < deadline, "deploy up created no pod"
        time.sleep(0.05)
    spec, env = created_pod(runpod_api)
    workspace = tmp_path / "volume"
    [wheel] = volume_contents(s3_volumes, "vol1", workspace)
    assert wheel.startswith("shizhen/releases/") and env["SHIZHEN_PACKAGE"] == f"/workspace/{wheel}"
    venv_sharing_this_environment(workspace / "shizhen" / "venv-workspace")
    pod_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env, "RUNPOD_POD_ID": "pod1",
               "RUNPOD_API_KEY": runpod_api.api_key, "RUNPOD_API_BASE_URL": runpod_api.url,
               "SHIZHEN_REQUIRE_GPU": "false",  # this machine has no GPU; on a pod the kit requires one
               "SHIZHEN_HOST": "127.0.0.1",
               "SHIZHEN_PIP": str(workspace / "shizhen/venv-workspace/bin/python -m pip"),
               "PIP_NO_INDEX": "1", "SHIZHEN_LOG_JSON": "false"}
    container = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount", "--kill-child", "bash", "-c",
         'mkdir -p /workspace && mount --bind "$0" /workspace && exec "$@"', str(workspace),
         *shlex.split(spec["dockerArgs"])],
        env=pod_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deploying.join(timeout=240)
        assert result == [0], "deploy up should see the pod healthy through the proxy"
        pid_1 = pid_1_of(container)
        assert Path(f"/proc/{pid_1}/cmdline").read_bytes().split(b"\0")[:2] == [b"bash", b"/tmp/start_pod.sh"]
        lines = []
        body = {"messages": [{"role": "user", "content": "舌"}], "max_tokens": 600, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", timeout=120, json=body,
                          headers={"Authorization": "Bearer clinic-key"}) as stream:
            for line in stream.iter_lines():
                lines.append(line)
                if len(lines) == 10:
                    os.kill(pid_1, signal.SIGTERM)  # what RunPod does to stop the pod
        data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert data[-1] == "[DONE]" and json.loads(data[-2])["usage"]["completion_tokens"] == 600
        output, _ = container.communicate(timeout=90)
    finally:
        proxy.close()
        if container.poll() is None:
            container.kill()
            print(container.communicate()[0][-3000:])
    assert container.returncode == 0, output[-3000:]
    assert "signal received: asking the server to drain" in output and "the server stopped (code 0)" in output
    server_log = (workspace / "shizhen" / "logs" / "server.log").read_text()
    assert "draining" in server_log and "draining" in output  # the server's own lines, on the container's stdout
    assert (workspace / "shizhen" / "venv-workspace" / "bin" / "shizhen").exists()  # the shipped wheel, installed


@pytest.fixture
def fake_pod(tmp_path, runpod_api):
    """The start script's environment with a stand-in pip and server command; RunPod's API is the stand-in."""
    runpod_api.pods["pod1"] = {"id": "pod1", "name": "shizhen", "desiredStatus": "RUNNING"}
    calls = tmp_path / "calls.log"
    fake_pip = tmp_path / "pip"
    fake_pip.write_text(f"#!/bin/sh\necho pip \"$@\" >> {calls}\n")
    fake_pip.chmod(0o755)
    env = {**os.environ, "WORKSPACE": str(tmp_path / "workspace"), "SHIZHEN_PIP": str(fake_pip),
           "SHIZHEN_RESTART_DELAY": "0.05", "SHIZHEN_PACKAGE": "/workspace/shizhen/releases/abc/shizhen.whl",
           "SHIZHEN_REQUIREMENTS_B64": base64.b64encode(b"torch==2.14.1\n").decode(), "RUNPOD_POD_ID": "pod1"}
    return env, calls


def fake_server(tmp_path: Path, calls: Path, body: str) -> str:
    script = tmp_path / "serve"
    script.write_text(f"#!/bin/sh\necho serve HF_HOME=$HF_HOME TRITON_CACHE_DIR=$TRITON_CACHE_DIR >> {calls}\n"
                      f"echo the server says hello\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_start_script_installs_once_restarts_with_backoff_and_logs_to_stdout_and_the_volume(fake_pod, tmp_path):
    env, calls = fake_pod
    workspace = Path(env["WORKSPACE"])
    # crashes twice, then stops cleanly (as after SIGTERM)
    env["SHIZHEN_SERVE_CMD"] = fake_server(tmp_path, calls, f"[ $(grep -c '^serve' {calls}) -ge 3 ] && exit 0; exit 1")
    for _ in range(2):
        result = subprocess.run(["bash", str(START_SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    lines = calls.read_text().splitlines()
    assert [line for line in lines if line.startswith("pip")] == [  # once, for both runs
        f"pip install -r {workspace}/shizhen/requirements.txt",
        f"pip install --no-deps --force-reinstall {env['SHIZHEN_PACKAGE']}"]
    assert (workspace / "shizhen" / "requirements.txt").read_text() == "torch==2.14.1\n"
    assert f"serve HF_HOME={workspace}/models TRITON_CACHE_DIR={workspace}/shizhen/triton-cache" in lines
    supervisor = (workspace / "shizhen" / "logs" / "supervisor.log").read_text()
    assert "exited with code 1; restarting in 0.05s" in supervisor and "restarting in 0.1s" in supervisor
    assert "the server stopped (code 0)" in supervisor
    assert "the server says hello" in result.stdout
    assert "the server says hello" in (workspace / "shizhen" / "logs" / "server.log").read_text()


def test_a_crash_looping_server_stops_its_pod(fake_pod, tmp_path, runpod_api):
    env, calls = fake_pod
    env |= {"SHIZHEN_SERVE_CMD": fake_server(tmp_path, calls, "exit 3"), "SHIZHEN_MAX_RESTARTS": "3"}
    pod = subprocess.Popen(["bash", str(START_SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        deadline = time.monotonic() + 60
        while "podStop" not in runpod_api.inputs:
            assert pod.poll() is None and time.monotonic() < deadline, "the pod was not stopped"
            time.sleep(0.05)
        assert runpod_api.inputs["podStop"] == [{"podId": "pod1"}]
        pod.send_signal(signal.SIGTERM)  # what RunPod does once the stop is asked for
        output, _ = pod.communicate(timeout=30)
    finally:
        if pod.poll() is None:
            pod.kill()
    assert "the server crashed 3 times in a row (last code 3)" in output
    assert calls.read_text().count("serve HF_HOME") == 3


def test_without_a_shipped_release_nothing_is_installed_and_the_pod_stops(fake_pod, tmp_path, runpod_api):
    env, calls = fake_pod
    del env["SHIZHEN_PACKAGE"]
    env["SHIZHEN_STOP_WAIT_SECONDS"] = "0.1"
    result = subprocess.run(["bash", str(START_SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "SHIZHEN_PACKAGE is not set" in result.stdout
    assert runpod_api.inputs["podStop"] == [{"podId": "pod1"}] and not calls.exists()


def test_off_a_pod_a_crash_loop_exits_at_once(fake_pod, tmp_path, monkeypatch):
    """Without RUNPOD_POD_ID there is no pod to stop and nothing to wait for: exit 1, not a 5-minute wait."""
    env, calls = fake_pod
    del env["RUNPOD_POD_ID"]
    env |= {"SHIZHEN_SERVE_CMD": fake_server(tmp_path, calls, "exit 3"), "SHIZHEN_MAX_RESTARTS": "2"}
    result = subprocess.run(["bash", str(START_SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "not on a RunPod pod" in result.stdout
