"""`shizhen deploy up | status | stop | start | down | logs` and `shizhen cost`: what a person types."""

from __future__ import annotations

import base64
import sys
import time
from importlib.resources import files
from pathlib import Path

import httpx

from ..config import Settings
from .runpod_client import DeployError, NoGpusOnResume, PodSpec, RunPodClient
from .settings import DeploySettings

REPO_ROOT = Path(__file__).resolve().parents[3]


def up(deploy: DeploySettings, server: Settings, client: RunPodClient) -> int:
    """Create or reuse the volume and the pod, wait until the API answers, print how to call it."""
    if not server.api_keys:
        print("warning: the endpoint will be public and SHIZHEN_API_KEYS is empty: anyone can use your GPU",
              file=sys.stderr)
    existing = client.find_pod(deploy.pod_name)
    if existing:
        print(f"pod {deploy.pod_name!r} exists ({existing['id']}, {existing.get('desiredStatus')}); reusing it")
        pod_id = existing["id"]
        if existing.get("desiredStatus") != "RUNNING":
            client.resume_pod(pod_id, deploy.gpu_count)
    else:
        volume_id, data_center = client.ensure_volume(deploy.volume_name, deploy.volume_gb, deploy.data_center)
        pod_id = client.create_pod(pod_spec(deploy, server, volume_id, data_center))
        print(f"created pod {pod_id} ({deploy.gpu_type}) on volume {deploy.volume_name} in {data_center}")
    url = wait_until_healthy(deploy, client, pod_id)
    print_usage(url, server)
    return 0


def pod_spec(deploy: DeploySettings, server: Settings, volume_id: str, data_center: str) -> PodSpec:
    script = (files("shizhen.deploy") / "start_pod.sh").read_bytes()
    env = {
        "SHIZHEN_MODEL": server.model,
        "SHIZHEN_SERVED_MODEL_NAME": server.model_name,
        "SHIZHEN_CACHE_DIR": "/workspace/models",
        "HF_HOME": "/workspace/models",
        "SHIZHEN_PORT": str(deploy.port),
        "SHIZHEN_CORS_ALLOWED_ORIGINS": ",".join(server.cors_allowed_origins),
        "SHIZHEN_MAX_MEMORY": "0=75GiB" if "80GB" in deploy.gpu_type else "",
        "SHIZHEN_PACKAGE": deploy.package,
        "SHIZHEN_REQUIREMENTS_B64": base64.b64encode((REPO_ROOT / "requirements.txt").read_bytes()).decode(),
    }
    if server.api_keys:
        env["SHIZHEN_API_KEYS"] = ",".join(key.get_secret_value() for key in server.api_keys)
    if server.idle_stop_seconds:
        env["SHIZHEN_IDLE_STOP_SECONDS"] = str(server.idle_stop_seconds)
    if server.max_uptime_hours:
        env["SHIZHEN_MAX_UPTIME_HOURS"] = str(server.max_uptime_hours)
    return PodSpec(
        name=deploy.pod_name, image=deploy.image, gpu_type=deploy.gpu_type, gpu_count=deploy.gpu_count,
        cloud_type=deploy.cloud_type, container_disk_gb=deploy.container_disk_gb, volume_id=volume_id,
        data_center=data_center, port=deploy.port, env={k: v for k, v in env.items() if v},
        docker_args=f"bash -c 'echo {base64.b64encode(script).decode()} | base64 -d > /tmp/start_pod.sh && "
                    "exec bash /tmp/start_pod.sh'",
    )


def wait_until_healthy(deploy: DeploySettings, client: RunPodClient, pod_id: str) -> str:
    """Poll the pod's state and its `/health` through the proxy, showing both, until the model is ready."""
    url = deploy.proxy_url.format(pod_id=pod_id, port=deploy.port)
    deadline = time.monotonic() + deploy.ready_timeout_seconds
    last = "no answer yet"
    while time.monotonic() < deadline:
        pod = client.pod(pod_id) or {}
        try:
            response = httpx.get(f"{url}/health", timeout=10)
            body = response.json()
            last = f"{response.status_code} {body}"
            if response.status_code == 200 and body.get("status") == "ok":
                print(f"\rpod {pod.get('desiredStatus', '?')}: model ready{' ' * 40}")
                return url
            state = body.get("phase") or body.get("error") or body.get("status")
        except (httpx.HTTPError, ValueError) as exc:
            state, last = "starting (no answer from the proxy yet)", f"{type(exc).__name__}: {exc}"
        print(f"\rpod {pod.get('desiredStatus', '?')}: {state}"[:120].ljust(120), end="", flush=True)
        time.sleep(deploy.poll_seconds)
    raise DeployError(f"pod {pod_id} did not become healthy within {deploy.ready_timeout_seconds:g} s; "
                      f"last /health answer: {last}")


def print_usage(url: str, server: Settings) -> None:
    key = "$SHIZHEN_API_KEY" if server.api_keys else "unused"
    print(f"""
endpoint: {url}/v1   (consultation page: {url}/)

curl {url}/v1/chat/completions -H 'Content-Type: application/json' -H "Authorization: Bearer {key}" \\
  -d '{{"model": "{server.model_name}", "messages": [{{"role": "user", "content": "舌红苔黄腻，是什么证型？"}}]}}'

python -c 'import openai; c = openai.OpenAI(base_url="{url}/v1", api_key="{key}"); \\
print(c.chat.completions.create(model="{server.model_name}", messages=[{{"role": "user", "content": "你好"}}]).choices[0].message.content)'
""")


def status(deploy: DeploySettings, client: RunPodClient) -> int:
    pod = client.find_pod(deploy.pod_name)
    if pod is None:
        print(f"no pod named {deploy.pod_name!r}")
        return 1
    pod = client.pod(pod["id"]) or pod
    uptime = pod.get("uptimeSeconds") or 0
    cost = pod.get("costPerHr") or 0.0
    url = deploy.proxy_url.format(pod_id=pod["id"], port=deploy.port)
    try:
        health = httpx.get(f"{url}/health", timeout=10).json().get("status")
    except (httpx.HTTPError, ValueError):
        health = "unreachable"
    gpu = (pod.get("machine") or {}).get("gpuDisplayName") or "?"
    print(f"pod {pod['id']} ({pod['name']}): {pod.get('desiredStatus')}, {pod.get('gpuCount', 0)}x {gpu}, up "
          f"{uptime / 3600:.1f} h, ${cost:.2f}/h (${cost * uptime / 3600:.2f} so far), health: {health}\n{url}")
    return 0


def stop(deploy: DeploySettings, client: RunPodClient) -> int:
    pod = _existing(deploy, client)
    client.stop_pod(pod["id"])
    print(f"stopped pod {pod['id']}; the volume keeps the model (storage is still billed)")
    return 0


def start(deploy: DeploySettings, server: Settings, client: RunPodClient, recreate: bool) -> int:
    pod = _existing(deploy, client)
    try:
        client.resume_pod(pod["id"], deploy.gpu_count)
    except NoGpusOnResume as exc:
        if not recreate:
            print(f"{exc}.\nRun `shizhen deploy start --recreate` to terminate it and create a new pod on the same "
                  "volume (the cached model is kept).", file=sys.stderr)
            return 2
        client.terminate_pod(pod["id"])
        return up(deploy, server, client)
    wait_until_healthy(deploy, client, pod["id"])
    print_usage(deploy.proxy_url.format(pod_id=pod["id"], port=deploy.port), server)
    return 0


def down(deploy: DeploySettings, client: RunPodClient, delete_volume: bool) -> int:
    pod = _existing(deploy, client)
    client.terminate_pod(pod["id"])
    print(f"terminated pod {pod['id']}")
    if delete_volume:
        volume_id, _ = client.ensure_volume(deploy.volume_name, deploy.volume_gb, None)
        client.terminate_volume(volume_id)
        print(f"deleted volume {deploy.volume_name} (the cached model is gone)")
    else:
        print(f"volume {deploy.volume_name} kept: the next `deploy up` starts from the cached model")
    return 0


def logs() -> int:
    print("RunPod's API does not serve container logs. On the pod, the start script logs to /workspace/shizhen/logs/"
          " (server.log, supervisor.log, install.log): open the pod's web terminal, or see the RunPod console.",
          file=sys.stderr)
    return 2


def _existing(deploy: DeploySettings, client: RunPodClient) -> dict:
    pod = client.find_pod(deploy.pod_name)
    if pod is None:
        raise DeployError(f"no pod named {deploy.pod_name!r}: run `shizhen deploy up`")
    return pod


def cost_table(gpu_price: float, storage_price_gb_month: float, volume_gb: int) -> list[tuple[str, float, float]]:
    """The seed design's scenarios: (name, GPU hours, storage months) priced as GPU + volume."""
    scenarios = [("testing, 8 h/day for two weeks", 8 * 14, 0.5), ("12 h/day, one month", 12 * 30, 1.0),
                 ("24/7, one month", 24 * 30, 1.0)]
    storage = storage_price_gb_month * volume_gb
    return [(name, hours * gpu_price, months * storage) for name, hours, months in scenarios]


def cost(deploy: DeploySettings, client: RunPodClient | None) -> int:
    price, source = deploy.gpu_price_per_hour, "settings"
    if client is not None:
        if (api_price := client.gpu_price(deploy.gpu_type)) is not None:
            price, source = api_price, "RunPod API"
    print(f"{deploy.gpu_type}: ${price:.2f}/h ({source}); volume {deploy.volume_gb} GB at "
          f"${deploy.storage_price_per_gb_month:.2f}/GB-month")
    print(f"{'scenario':36} {'GPU':>10} {'storage':>9} {'total':>10}")
    for name, gpu, storage in cost_table(price, deploy.storage_price_per_gb_month, deploy.volume_gb):
        print(f"{name:36} {gpu:>10.2f} {storage:>9.2f} {gpu + storage:>10.2f}")
    return 0
