"""`shizhen deploy up | status | stop | start | down | logs` and `shizhen cost`: what a person types."""

from __future__ import annotations

import sys
import time

import httpx

from ..config import Settings
from .release import POD_VOLUME, Release, container_env, prepare_release, start_command
from .runpod_client import DeployedPod, DeployError, NoGpusOnResume, PodSpec, RunPodClient
from .settings import DeploySettings

PROGRESS_WIDTH = 120


def up(deploy: DeploySettings, server: Settings, client: RunPodClient) -> int:
    """Ship this checkout, create the pod or bring the existing one to the wanted spec, wait for the API."""
    if not server.api_keys:
        print("warning: the endpoint will be public and SHIZHEN_API_KEYS is empty: anyone can use your GPU",
              file=sys.stderr)
    volume_id, data_center = client.ensure_volume(deploy.volume_name, deploy.volume_gb, deploy.data_center)
    release = prepare_release(deploy, volume_id, data_center)
    print(f"shipping commit {release.commit[:12]} ({release.requirement(POD_VOLUME)})")
    spec = pod_spec(deploy, server, release, volume_id, data_center)
    existing = client.find_pod(deploy.pod_name)
    if existing:
        pod_id = reconcile(client, existing["id"], spec)
    else:
        pod_id = client.create_pod(spec)
        print(f"created pod {pod_id} ({deploy.gpu_type}) on volume {deploy.volume_name} in {data_center}")
    url = wait_until_healthy(deploy, client, pod_id)
    print_usage(url, server.model_name, "SHIZHEN_API_KEYS" if server.api_keys else None)
    return 0


def reconcile(client: RunPodClient, pod_id: str, spec: PodSpec) -> str:
    """Bring an existing pod to `spec`: the same pod when only its image, env or start command differ (RunPod
    restarts it), a new one on the same volume when the GPU or the volume differ. Never keeps an old setting."""
    pod = client.deployed(pod_id)
    if pod is None:
        raise DeployError(f"pod {pod_id} disappeared while deploying; run `shizhen deploy up` again")
    if (pod.gpu_type not in (None, spec.gpu_type) or pod.gpu_count != spec.gpu_count
            or pod.network_volume_id not in (None, spec.volume_id)):
        print(f"pod {pod_id} runs {pod.gpu_count}x {pod.gpu_type} on volume {pod.network_volume_id}; wanted "
              f"{spec.gpu_count}x {spec.gpu_type} on {spec.volume_id}: terminating it and creating a new one on the "
              "same volume (the cached model is kept)")
        client.terminate_pod(pod_id)
        return client.create_pod(spec)
    if changes := spec_changes(pod, spec):
        print(f"updating pod {pod_id}: {'; '.join(changes)} (RunPod restarts it)")
        client.edit_pod(pod_id, spec)
    else:
        print(f"pod {pod_id} already runs this release with these settings")
    if pod.desired_status != "RUNNING":
        client.resume_pod(pod_id, spec.gpu_count)
    return pod_id


def spec_changes(pod: DeployedPod, spec: PodSpec) -> list[str]:
    """What differs between a pod and the wanted spec, by name only (env values may be keys)."""
    changes = [f"image {pod.image} -> {spec.image}"] if pod.image != spec.image else []
    if pod.docker_args != spec.docker_args:
        changes.append("start script")
    ours = {key for key in pod.env if key.startswith(("SHIZHEN_", "HF_"))}  # RunPod adds its own variables
    for key in sorted(ours | set(spec.env)):
        if key not in spec.env:
            changes.append(f"{key} removed")
        elif pod.env.get(key) != spec.env[key]:
            changes.append(f"{key} {'set' if key not in pod.env else 'changed'}")
    return changes


def pod_spec(deploy: DeploySettings, server: Settings, release: Release, volume_id: str,
             data_center: str) -> PodSpec:
    idle = deploy.idle_stop_seconds if server.idle_stop_seconds is None else server.idle_stop_seconds
    uptime = deploy.max_uptime_hours if server.max_uptime_hours is None else server.max_uptime_hours
    env = container_env(
        deploy, server, release, POD_VOLUME,
        SHIZHEN_PORT=str(deploy.port),
        SHIZHEN_MAX_MEMORY="0=75GiB" if "80GB" in deploy.gpu_type else "",
        SHIZHEN_STAY_UP_ON_LOAD_FAILURE="true",  # `up` and `status` show the reason; the idle stop ends the bill
        SHIZHEN_IDLE_STOP_SECONDS=f"{idle:g}" if idle else "",
        SHIZHEN_MAX_UPTIME_HOURS=f"{uptime:g}" if uptime else "",
        SHIZHEN_API_KEYS=",".join(key.get_secret_value() for key in server.api_keys),
    )
    return PodSpec(
        name=deploy.pod_name, image=deploy.image, gpu_type=deploy.gpu_type, gpu_count=deploy.gpu_count,
        cloud_type=deploy.cloud_type, container_disk_gb=deploy.container_disk_gb, volume_id=volume_id,
        data_center=data_center, port=deploy.port, env=env,
        docker_args=start_command(),
        cuda_versions=deploy.cuda_versions,
    )


def wait_until_healthy(deploy: DeploySettings, client: RunPodClient, pod_id: str) -> str:
    """Poll the pod's state and its `/health` through the proxy, showing both, until the model is ready; stop at
    the first `failed` answer, with its reason."""
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
                print(f"\rpod {pod.get('desiredStatus', '?')}: model ready".ljust(PROGRESS_WIDTH))
                return url
            if body.get("status") == "failed":
                print()
                raise DeployError(f"the server on pod {pod_id} failed to start: {body.get('error')}\nThe pod is "
                                  "still running (and billed): see `shizhen deploy logs`, fix the cause, then "
                                  "`shizhen deploy up` again, or `shizhen deploy stop`.")
            state = body.get("phase") or body.get("error") or body.get("status")
        except (httpx.HTTPError, ValueError) as exc:
            state, last = "starting (no answer from the proxy yet)", f"{type(exc).__name__}: {exc}"
        print(f"\rpod {pod.get('desiredStatus', '?')}: {state}"[:PROGRESS_WIDTH].ljust(PROGRESS_WIDTH), end="",
              flush=True)
        time.sleep(deploy.poll_seconds)
    print()
    raise DeployError(f"pod {pod_id} did not become healthy within {deploy.ready_timeout_seconds:g} s; "
                      f"last /health answer: {last}. The pod is still running (and billed).")


def print_usage(url: str, model_name: str, key_variable: str | None) -> None:
    """Examples that work pasted into the shell `deploy` ran in: they read the key from `key_variable` (the first
    of a comma-separated list), as that shell has it."""
    curl_key, python_key = "unused", '"unused"'
    if key_variable:
        curl_key, python_key = f"${{{key_variable}%%,*}}", f'os.environ["{key_variable}"].split(",")[0]'
    print(f"""
endpoint: {url}/v1   (consultation page: {url}/)

curl {url}/v1/chat/completions -H 'Content-Type: application/json' -H "Authorization: Bearer {curl_key}" \\
  -d '{{"model": "{model_name}", "messages": [{{"role": "user", "content": "舌红苔黄腻，是什么证型？"}}]}}'

python3 -c 'import os, openai; c = openai.OpenAI(base_url="{url}/v1", api_key={python_key}); \\
print(c.chat.completions.create(model="{model_name}", messages=[{{"role": "user", "content": "你好"}}]).choices[0].message.content)'
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
    url = wait_until_healthy(deploy, client, pod["id"])
    print_usage(url, server.model_name, "SHIZHEN_API_KEYS" if server.api_keys else None)
    return 0


def down(deploy: DeploySettings, client: RunPodClient, delete_volume_too: bool) -> int:
    """Terminate the pod if there is one; with `delete_volume_too`, also the volume (with or without a pod)."""
    pod = client.find_pod(deploy.pod_name)
    if pod is not None:
        client.terminate_pod(pod["id"])
        print(f"terminated pod {pod['id']}")
    elif not delete_volume_too:
        raise DeployError(f"no pod named {deploy.pod_name!r}")
    else:
        print(f"no pod named {deploy.pod_name!r}")
    if not delete_volume_too:
        print(f"volume {deploy.volume_name} kept: the next `deploy up` starts from the cached model")
        return 0
    return delete_volume(deploy, client)


def delete_volume(deploy: DeploySettings, client: RunPodClient) -> int:
    volume = client.find_volume(deploy.volume_name)
    if volume is None:
        print(f"no volume named {deploy.volume_name!r}")
        return 0
    client.terminate_volume(volume["id"])
    print(f"deleted volume {deploy.volume_name} ({volume['id']}; the cached model is gone)")
    return 0


def logs(deploy: DeploySettings, client: RunPodClient, tail: int, follow: bool) -> int:
    """The container's output (start script, install, server) from RunPod's logs API."""
    pod = _existing(deploy, client)
    for line in client.log_lines(pod["id"], tail=tail, follow=follow):
        print(line, flush=True)
    if not follow:
        print(f"(last {tail} lines of pod {pod['id']}; --follow streams new ones; on the pod they are in "
              "/workspace/shizhen/logs/)", file=sys.stderr)
    return 0


def _existing(deploy: DeploySettings, client: RunPodClient) -> dict:
    pod = client.find_pod(deploy.pod_name)
    if pod is None:
        raise DeployError(f"no pod named {deploy.pod_name!r}: run `shizhen deploy up`")
    return pod


HOURS_PER_MONTH = 24 * 30
SCENARIOS = [("testing, 8 h/day for two weeks", 8, 14), ("12 h/day, one month", 12, 30), ("24/7, one month", 24, 30)]


def cost_table(gpu_price: float, deploy: DeploySettings) -> list[tuple[str, float, float, float]]:
    """The seed design's scenarios on a pod: (name, GPU, container disk, volume) in dollars. The container disk is
    billed only while the pod runs; the network volume all month, running or not."""
    disk_per_hour = deploy.container_disk_price_per_gb_month * deploy.container_disk_gb / HOURS_PER_MONTH
    volume_per_day = deploy.storage_price_per_gb_month * deploy.volume_gb / 30
    return [(name, hours * days * gpu_price, hours * days * disk_per_hour, days * volume_per_day)
            for name, hours, days in SCENARIOS]


def serverless_worker_hours(deploy: DeploySettings, open_hours: float, consultations: int) -> float:
    """Worker hours a day for `consultations` spread evenly over `open_hours`: when they are further apart than the
    idle timeout, each wakes a worker (cold start + answer + idle timeout); closer, one worker stays up all along."""
    if consultations == 0:
        return 0.0
    apart = open_hours * 3600 / consultations
    if apart > deploy.idle_timeout_seconds + deploy.cold_start_seconds:
        per_wake = deploy.cold_start_seconds + deploy.answer_seconds + deploy.idle_timeout_seconds
        return consultations * per_wake / 3600
    return (open_hours * 3600 + deploy.cold_start_seconds + deploy.idle_timeout_seconds) / 3600


def cost(deploy: DeploySettings, client: RunPodClient | None, consultations: int) -> int:
    price, source = deploy.gpu_price_per_hour, "settings"
    if client is not None:
        if (api_price := client.gpu_price(deploy.gpu_type)) is not None:
            price, source = api_price, "RunPod API"
    print(f"pod: {deploy.gpu_type}: ${price:.2f}/h ({source}); container disk {deploy.container_disk_gb} GB at "
          f"${deploy.container_disk_price_per_gb_month:.2f}/GB-month while running; volume {deploy.volume_gb} GB "
          f"at ${deploy.storage_price_per_gb_month:.2f}/GB-month")
    print(f"{'scenario':36} {'GPU':>10} {'disk':>7} {'volume':>8} {'total':>10}")
    pod_totals = []
    for name, gpu, disk, volume in cost_table(price, deploy):
        pod_totals.append(gpu + disk + volume)
        print(f"{name:36} {gpu:>10.2f} {disk:>7.2f} {volume:>8.2f} {gpu + disk + volume:>10.2f}")
    per_hour = deploy.serverless_price_per_second * 3600
    print(f"\nserverless, {consultations} consultations a day over the same hours: ${per_hour:.2f}/worker-hour "
          f"(settings: SHIZHEN_DEPLOY_SERVERLESS_PRICE_PER_SECOND), each cold start {deploy.cold_start_seconds:g} s, "
          f"{deploy.answer_seconds:g} s an answer, idle stop {deploy.idle_timeout_seconds} s; the same volume")
    print(f"{'scenario':36} {'worker h':>10} {'workers':>8} {'volume':>8} {'total':>10} {'pod':>10}")
    volume_per_day = deploy.storage_price_per_gb_month * deploy.volume_gb / 30
    for (name, hours, days), pod_total in zip(SCENARIOS, pod_totals, strict=True):
        worker_hours = serverless_worker_hours(deploy, hours, consultations) * days
        total = worker_hours * per_hour + days * volume_per_day
        print(f"{name:36} {worker_hours:>10.1f} {worker_hours * per_hour:>8.2f} {days * volume_per_day:>8.2f} "
              f"{total:>10.2f} {pod_total:>10.2f}")
    return 0
