"""`shizhen deploy ... --serverless`: the same server as a RunPod load-balancing endpoint that scales to zero.

RunPod routes HTTP straight to each worker's own server (no job queue) and starts and stops workers itself: the
whole API, streaming and the page run unchanged. Workers run the pod's start script (the release shipped the same
way, the model cached on the same network volume, mounted at /runpod-volume), answer RunPod's health checks on
/ping (204 loading, 200 serving) and drain on SIGTERM. The endpoint's URL takes the RunPod API key as its bearer
token, which the load balancer checks; so the server's own SHIZHEN_API_KEYS are not used there.
"""

from __future__ import annotations

import sys
import time

import httpx

from ..config import Settings
from .commands import PROGRESS_WIDTH, delete_volume, print_usage
from .release import WORKER_VOLUME, Release, container_env, prepare_release, start_command
from .runpod_client import DeployError, RunPodClient, WorkerSpec
from .settings import DeploySettings

HEALTH_STATES = {204: "a worker is loading the model (cold start)", 200: "serving"}


def up(deploy: DeploySettings, server: Settings, client: RunPodClient) -> int:
    """Ship this checkout, create or update the template and the endpoint, wait until a worker serves."""
    if server.api_keys:
        print("note: a serverless endpoint is guarded by your RunPod API key (its bearer token); SHIZHEN_API_KEYS "
              "are not sent to the workers", file=sys.stderr)
    volume_id, data_center = client.ensure_volume(deploy.volume_name, deploy.volume_gb, deploy.data_center)
    release = prepare_release(deploy, volume_id, data_center)
    print(f"shipping commit {release.commit[:12]} ({release.requirement(WORKER_VOLUME)})")
    spec = worker_spec(deploy, server, release, volume_id)
    template = client.find_template(spec.template_name)
    template_id = client.save_template(spec, template["id"] if template else None)
    existing = client.find_endpoint(spec.endpoint_name)
    endpoint = client.save_endpoint(spec, template_id, existing["id"] if existing else None)
    print(f"{'updated' if existing else 'created'} endpoint {endpoint['id']} ({', '.join(spec.gpu_ids)}, "
          f"{spec.workers_min}-{spec.workers_max} workers, idle stop {spec.idle_timeout_seconds} s) on volume "
          f"{deploy.volume_name} in {data_center}")
    url = deploy.serverless_url.format(endpoint_id=endpoint["id"])
    wait_until_serving(deploy, client, url)
    print_usage(url, server.model_name, "RUNPOD_API_KEY")
    return 0


def worker_spec(deploy: DeploySettings, server: Settings, release: Release, volume_id: str) -> WorkerSpec:
    env = container_env(
        deploy, server, release, WORKER_VOLUME,
        PORT=str(deploy.port),  # RunPod's worker contract; /ping is served on the same port
        SHIZHEN_MAX_MEMORY="0=75GiB",  # every pool in serverless_gpu_ids is an 80 GB one
        SHIZHEN_STOP_POD_ON_FAILURE="0",  # a worker that gives up exits; RunPod replaces it
    )
    return WorkerSpec(
        template_name=f"{deploy.endpoint_name}-worker", image=deploy.image, container_disk_gb=deploy.container_disk_gb,
        port=deploy.port, env=env, docker_args=start_command(),
        endpoint_name=deploy.endpoint_name, gpu_ids=deploy.serverless_gpu_ids, workers_min=deploy.workers_min,
        workers_max=deploy.workers_max, idle_timeout_seconds=deploy.idle_timeout_seconds,
        requests_per_worker=deploy.requests_per_worker, volume_id=volume_id, cuda_versions=deploy.cuda_versions,
    )


def wait_until_serving(deploy: DeploySettings, client: RunPodClient, url: str) -> None:
    """Ask the endpoint's /ping (it wakes a worker) until a worker answers 200; the first time, the worker
    installs the release and downloads the model onto the volume: minutes."""
    deadline = time.monotonic() + deploy.ready_timeout_seconds
    started, last = time.monotonic(), "no answer yet"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/ping", headers={"Authorization": f"Bearer {client.api_key}"}, timeout=130)
            if response.status_code == 200:
                print(f"\rendpoint: serving after {time.monotonic() - started:.0f} s".ljust(PROGRESS_WIDTH))
                return
            if response.status_code == 401:
                raise DeployError("the endpoint refused the RunPod API key (401)")
            last = HEALTH_STATES.get(response.status_code, f"waiting for a worker ({response.status_code})")
        except httpx.HTTPError as exc:
            last = f"waiting for a worker ({type(exc).__name__})"
        print(f"\rendpoint: {last}, {time.monotonic() - started:.0f} s"[:PROGRESS_WIDTH].ljust(PROGRESS_WIDTH),
              end="", flush=True)
        time.sleep(deploy.poll_seconds)
    print()
    raise DeployError(f"no worker of {url} served within {deploy.ready_timeout_seconds:g} s ({last}); see the "
                      "endpoint's workers and logs in the RunPod console")


def status(deploy: DeploySettings, client: RunPodClient) -> int:
    endpoint = client.find_endpoint(deploy.endpoint_name)
    if endpoint is None:
        print(f"no endpoint named {deploy.endpoint_name!r}")
        return 1
    url = deploy.serverless_url.format(endpoint_id=endpoint["id"])
    try:
        code = httpx.get(f"{url}/ping", headers={"Authorization": f"Bearer {client.api_key}"}, timeout=10).status_code
        health = HEALTH_STATES.get(code, f"no worker serving ({code})")
    except httpx.HTTPError:
        health = "unreachable"
    print(f"endpoint {endpoint['id']} ({endpoint['name']}): {endpoint['workersMin']}-{endpoint['workersMax']} "
          f"workers on {endpoint['gpuIds']}, idle stop {endpoint['idleTimeout']} s, health: {health}\n{url}")
    return 0


def stop(deploy: DeploySettings, client: RunPodClient) -> int:
    endpoint = _existing(deploy, client)
    client.scale_endpoint(endpoint, workers_max=0)
    print(f"endpoint {endpoint['id']} scaled to 0 workers (`deploy up --serverless` brings it back); the volume "
          "keeps the model")
    return 0


def down(deploy: DeploySettings, client: RunPodClient, delete_volume_too: bool) -> int:
    """Delete the endpoint and its template; with `delete_volume_too`, the volume as well."""
    endpoint = client.find_endpoint(deploy.endpoint_name)
    if endpoint is not None:
        client.scale_endpoint(endpoint, workers_max=0)  # RunPod deletes an endpoint only without workers
        client.delete_endpoint(endpoint["id"])
        print(f"deleted endpoint {endpoint['id']}")
    elif not delete_volume_too:
        raise DeployError(f"no endpoint named {deploy.endpoint_name!r}")
    if client.find_template(f"{deploy.endpoint_name}-worker"):
        client.delete_template(f"{deploy.endpoint_name}-worker")
    return delete_volume(deploy, client) if delete_volume_too else 0


def _existing(deploy: DeploySettings, client: RunPodClient) -> dict:
    endpoint = client.find_endpoint(deploy.endpoint_name)
    if endpoint is None:
        raise DeployError(f"no endpoint named {deploy.endpoint_name!r}: run `shizhen deploy up --serverless`")
    return endpoint
