"""RunPod through the official `runpod` SDK (it reads `RUNPOD_API_BASE_URL`), with errors a person can act on.

The key comes from `RUNPOD_API_KEY` or the SDK's own config (`runpod config`); it is never printed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import runpod
from runpod import error as runpod_error
from runpod.api.graphql import run_graphql_query

NO_CAPACITY = "no longer any instances available"
NO_GPUS_ON_HOST = "not enough free gpus"


class DeployError(RuntimeError):
    """A deployment step failed; the message says what to do."""


class NoGpusOnResume(DeployError):
    """The stopped pod's host has no free GPU: its volume stays, the pod must be recreated elsewhere."""


@dataclass(frozen=True)
class PodSpec:
    name: str
    image: str
    gpu_type: str
    gpu_count: int
    cloud_type: str
    container_disk_gb: int
    volume_id: str
    data_center: str
    port: int
    env: dict[str, str]
    docker_args: str
    cuda_versions: list[str]

    @property
    def ports(self) -> str:
        """The API over RunPod's HTTPS proxy; SSH over TCP (sshd runs when the account has a public key)."""
        return f"{self.port}/http,22/tcp"


@dataclass(frozen=True)
class DeployedPod:
    """What RunPod says a pod is running: compared with the wanted PodSpec before reusing it."""
    id: str
    desired_status: str
    image: str
    gpu_type: str | None
    gpu_count: int
    env: dict[str, str]
    docker_args: str
    network_volume_id: str | None

    @classmethod
    def from_api(cls, pod: dict) -> DeployedPod:
        env = dict(item.split("=", 1) for item in pod.get("env") or [] if "=" in item)
        return cls(pod["id"], pod.get("desiredStatus") or "", pod.get("imageName") or "",
                   (pod.get("machine") or {}).get("gpuTypeId"), pod.get("gpuCount") or 0, env,
                   pod.get("dockerArgs") or "", pod.get("networkVolumeId"))


@dataclass(frozen=True)
class WorkerSpec:
    """A serverless load-balancing endpoint and the template its workers run."""
    template_name: str
    image: str
    container_disk_gb: int
    port: int
    env: dict[str, str]
    docker_args: str
    endpoint_name: str
    gpu_ids: list[str]  # pools in order of preference
    workers_min: int
    workers_max: int
    idle_timeout_seconds: int
    requests_per_worker: int
    volume_id: str
    cuda_versions: list[str]


class RunPodClient:
    def __init__(self, api_key: str | None = None):
        self._api_key = api_key or os.environ.get("RUNPOD_API_KEY") or runpod.api_key
        if not self._api_key:
            raise DeployError("no RunPod API key: set RUNPOD_API_KEY or run `runpod config`")
        runpod.api_key = self._api_key  # the SDK's mutations read the module-level key

    def _graphql(self, query: str) -> dict:
        return self._call(run_graphql_query, query, api_key=self._api_key)["data"]

    @staticmethod
    def _call(function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except runpod_error.AuthenticationError:
            raise DeployError("RunPod refused the API key (401): check RUNPOD_API_KEY") from None
        except runpod_error.QueryError as exc:
            raise DeployError(f"RunPod: {exc}") from None

    # --- volumes ---------------------------------------------------------------------------------------------------
    def find_volume(self, name: str) -> dict | None:
        volumes = self._graphql("query { myself { networkVolumes { id name size dataCenterId } } }")
        return next((v for v in volumes["myself"]["networkVolumes"] or [] if v["name"] == name), None)

    def ensure_volume(self, name: str, size_gb: int, data_center: str | None) -> tuple[str, str]:
        """The id and data centre of the network volume called `name`, created if there is none."""
        if volume := self.find_volume(name):
            if data_center and volume["dataCenterId"] != data_center:
                raise DeployError(
                    f"volume {name!r} is in data centre {volume['dataCenterId']}, not {data_center}: deploy "
                    f"there (SHIZHEN_DEPLOY_DATA_CENTER={volume['dataCenterId']}) or choose another volume name")
            return volume["id"], volume["dataCenterId"]
        if not data_center:
            raise DeployError(f"volume {name!r} does not exist yet: set SHIZHEN_DEPLOY_DATA_CENTER to create it")
        created = self._graphql(
            f"mutation {{ createNetworkVolume(input: {{name: {json.dumps(name)}, size: {size_gb}, "
            f"dataCenterId: {json.dumps(data_center)}}}) {{ id name size dataCenterId }} }}")["createNetworkVolume"]
        return created["id"], created["dataCenterId"]

    # --- pods ------------------------------------------------------------------------------------------------------
    def create_pod(self, spec: PodSpec) -> str:
        try:
            pod = runpod.create_pod(
                _escaped(spec.name), spec.image, spec.gpu_type, cloud_type=spec.cloud_type, gpu_count=spec.gpu_count,
                container_disk_in_gb=spec.container_disk_gb, network_volume_id=spec.volume_id,
                data_center_id=spec.data_center, ports=spec.ports, volume_mount_path="/workspace",
                env={key: _escaped(value) for key, value in spec.env.items()}, docker_args=_escaped(spec.docker_args),
                support_public_ip=True, start_ssh=True, allowed_cuda_versions=spec.cuda_versions,
            )
        except runpod_error.AuthenticationError:
            raise DeployError("RunPod refused the API key (401): check RUNPOD_API_KEY") from None
        except ValueError:  # the SDK's check that the GPU type exists
            raise DeployError(f"RunPod has no GPU type {spec.gpu_type!r}; types: {self._gpu_names()}") from None
        except runpod_error.QueryError as exc:
            if NO_CAPACITY in str(exc).lower():
                raise DeployError(f"no {spec.gpu_type} is free in {spec.data_center} right now; other GPU types: "
                                  f"{self._gpu_names()} (SHIZHEN_DEPLOY_GPU_TYPE), or try later") from None
            raise DeployError(f"RunPod: {exc}") from None
        return pod["id"]

    def pod(self, pod_id: str) -> dict | None:
        return self._call(runpod.get_pod, pod_id)

    def deployed(self, pod_id: str) -> DeployedPod | None:
        """The pod's image, GPU, env and start command (fields the SDK's own pod query leaves out)."""
        pod = self._graphql(
            f"query {{ pod(input: {{podId: {json.dumps(pod_id)}}}) {{ id desiredStatus imageName gpuCount env "
            f"dockerArgs networkVolumeId machine {{ gpuTypeId }} }} }}")["pod"]
        return DeployedPod.from_api(pod) if pod else None

    def edit_pod(self, pod_id: str, spec: PodSpec) -> None:
        """New image, env and start command for an existing pod; RunPod restarts it with them."""
        env = _env_literal(spec.env)
        self._graphql(
            f"mutation {{ podEditJob(input: {{podId: {json.dumps(pod_id)}, imageName: {json.dumps(spec.image)}, "
            f"dockerArgs: {json.dumps(spec.docker_args)}, containerDiskInGb: {spec.container_disk_gb}, "
            f"ports: {json.dumps(spec.ports)}, volumeMountPath: \"/workspace\", env: [{env}]}}) {{ id }} }}")

    def find_pod(self, name: str) -> dict | None:
        return next((p for p in self._call(runpod.get_pods) if p["name"] == name), None)

    def stop_pod(self, pod_id: str) -> None:
        self._call(runpod.stop_pod, pod_id)

    def resume_pod(self, pod_id: str, gpu_count: int) -> None:
        try:
            runpod.resume_pod(pod_id, gpu_count)
        except runpod_error.QueryError as exc:
            if NO_GPUS_ON_HOST in str(exc).lower():
                raise NoGpusOnResume(f"RunPod resumed pod {pod_id} with zero GPUs: its host has none free") from None
            raise DeployError(f"RunPod: {exc}") from None

    def terminate_pod(self, pod_id: str) -> None:
        self._call(runpod.terminate_pod, pod_id)

    def terminate_volume(self, volume_id: str) -> None:
        self._graphql(f"mutation {{ deleteNetworkVolume(input: {{id: {json.dumps(volume_id)}}}) }}")

    # --- serverless -------------------------------------------------------------------------------------------------
    def find_template(self, name: str) -> dict | None:
        templates = self._graphql("query { myself { podTemplates { id name isServerless } } }")
        return next((t for t in templates["myself"]["podTemplates"] or [] if t["name"] == name), None)

    def save_template(self, spec: WorkerSpec, template_id: str | None) -> str:
        """Create the workers' template, or update it in place (`id`): new workers start with the new one."""
        env = _env_literal(spec.env)
        identity = f"id: {json.dumps(template_id)}, " if template_id else ""
        saved = self._graphql(
            f"mutation {{ saveTemplate(input: {{{identity}name: {json.dumps(spec.template_name)}, "
            f"imageName: {json.dumps(spec.image)}, dockerArgs: {json.dumps(spec.docker_args)}, "
            f"containerDiskInGb: {spec.container_disk_gb}, volumeInGb: 0, ports: \"{spec.port}/http\", "
            f"env: [{env}], isServerless: true, readme: \"\"}}) {{ id name }} }}")
        return saved["saveTemplate"]["id"]

    def find_endpoint(self, name: str) -> dict | None:
        endpoints = self._graphql("query { myself { endpoints { id name templateId gpuIds type workersMin workersMax "
                                  "idleTimeout scalerType scalerValue networkVolumeId } } }")
        return next((e for e in endpoints["myself"]["endpoints"] or [] if e["name"] == name), None)

    def save_endpoint(self, spec: WorkerSpec, template_id: str, endpoint_id: str | None) -> dict:
        """Create the load-balancing endpoint, or update it in place (`id`)."""
        identity = f"id: {json.dumps(endpoint_id)}, " if endpoint_id else ""
        saved = self._graphql(
            f"mutation {{ saveEndpoint(input: {{{identity}name: {json.dumps(spec.endpoint_name)}, "
            f"templateId: {json.dumps(template_id)}, gpuIds: {json.dumps(','.join(spec.gpu_ids))}, type: \"LB\", "
            f"workersMin: {spec.workers_min}, workersMax: {spec.workers_max}, idleTimeout: "
            f"{spec.idle_timeout_seconds}, scalerType: \"REQUEST_COUNT\", scalerValue: {spec.requests_per_worker}, "
            f"networkVolumeId: {json.dumps(spec.volume_id)}, allowedCudaVersions: "
            f"{json.dumps(','.join(spec.cuda_versions))}, flashBootType: FLASHBOOT}}) "
            f"{{ id name workersMin workersMax }} }}")
        return saved["saveEndpoint"]

    def scale_endpoint(self, endpoint: dict, workers_max: int) -> None:
        """Change an existing endpoint's worker bounds only (0 and 0: no worker runs, nothing is billed but disk)."""
        self._graphql(
            f"mutation {{ saveEndpoint(input: {{id: {json.dumps(endpoint['id'])}, "
            f"name: {json.dumps(endpoint['name'])}, "
            f"templateId: {json.dumps(endpoint['templateId'])}, gpuIds: {json.dumps(endpoint['gpuIds'])}, "
            f"workersMin: {min(endpoint['workersMin'] or 0, workers_max)}, workersMax: {workers_max}}}) {{ id }} }}")

    def delete_endpoint(self, endpoint_id: str) -> None:
        self._graphql(f"mutation {{ deleteEndpoint(id: {json.dumps(endpoint_id)}) }}")

    def delete_template(self, name: str) -> None:
        self._graphql(f"mutation {{ deleteTemplate(templateName: {json.dumps(name)}) }}")

    @property
    def api_key(self) -> str:
        """For the endpoint's URL, which takes the RunPod key as its bearer token."""
        return self._api_key

    def log_lines(self, pod_id: str, tail: int, follow: bool, idle_seconds: float = 3.0) -> Iterator[str]:
        """The pod's container log through RunPod's v2 REST API (Server-Sent Events). The stream never ends by
        itself: without `follow`, stop once no line came for `idle_seconds` (the backfill is over)."""
        base = os.environ.get("RUNPOD_API_BASE_URL", "https://api.runpod.io")
        timeout = httpx.Timeout(30, read=None if follow else idle_seconds)
        try:
            with httpx.stream("GET", f"{base}/v2/pods/{pod_id}/logs", params={"tail": tail, "source": "container"},
                              headers={"Authorization": f"Bearer {self._api_key}"}, timeout=timeout) as response:
                if response.status_code in (401, 403):
                    raise DeployError(f"RunPod refused the API key for the pod's logs ({response.status_code})")
                if response.status_code != 200:
                    raise DeployError(f"RunPod's logs API answered {response.status_code}: {response.read()[:200]}")
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        yield json.loads(line[5:]).get("line", "")
        except httpx.ReadTimeout:
            return
        except httpx.HTTPError as exc:
            raise DeployError(f"RunPod's logs API: {exc}") from None

    def gpu_price(self, gpu_type: str) -> float | None:
        """On-demand $/hour of one GPU of this type in the secure cloud, if the API gives it."""
        gpu = self._call(runpod.get_gpu, gpu_type)
        return gpu.get("securePrice") or (gpu.get("lowestPrice") or {}).get("uninterruptablePrice")

    def _gpu_names(self) -> str:
        return ", ".join(gpu["id"] for gpu in self._call(runpod.get_gpus) if gpu.get("memoryInGb", 0) >= 24)


def _escaped(text: str) -> str:
    """`text` escaped for the inside of a GraphQL string literal (JSON's escapes are GraphQL's): the SDK puts names
    and env values between quotes as they are, so a quote or backslash in an API key would break the mutation."""
    return json.dumps(text)[1:-1]


def _env_literal(env: dict[str, str]) -> str:
    """`env` as the inside of a GraphQL list of EnvironmentVariableInput (JSON strings are GraphQL strings)."""
    return ", ".join(f"{{key: {json.dumps(key)}, value: {json.dumps(value)}}}" for key, value in env.items())
