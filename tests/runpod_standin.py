"""A local stand-in for RunPod's API (the SDK and the kit read RUNPOD_API_BASE_URL).

GraphQL: every operation is parsed and validated against `runpod_schema.graphql` (RunPod's schema as its public
references give it) by graphql-core, then executed against in-memory pods and volumes, so a misspelt field, a
string where RunPod wants an enum or a missing selection set fails here as it would there. REST v2: the pod logs
stream (`GET /v2/pods/{id}/logs`, Server-Sent Events), as runpod/docs' api-reference-v2/openapi.json describes it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from graphql import build_schema, graphql_sync, parse, validate
from local_http import LocalHTTPServer, QuietHandler

SCHEMA = build_schema((Path(__file__).parent / "runpod_schema.graphql").read_text())

GPUS = [
    {"id": "NVIDIA A100 80GB PCIe", "displayName": "A100 80GB PCIe", "memoryInGb": 80},
    {"id": "NVIDIA H100 80GB HBM3", "displayName": "H100 80GB", "memoryInGb": 80},
    {"id": "NVIDIA GeForce RTX 4090", "displayName": "RTX 4090", "memoryInGb": 24},
    {"id": "NVIDIA RTX A4000", "displayName": "RTX A4000", "memoryInGb": 16},
]


class GraphQLRejected(Exception):
    """What RunPod answers with an `errors` list."""


class StandInRunPod:
    def __init__(self, api_key: str = "rp-test-key"):
        self.api_key = api_key
        self.queries: list[str] = []
        self.inputs: dict[str, list[dict]] = {}  # operation -> the `input` arguments it received, parsed
        self.volumes: list[dict] = []
        self.pods: dict[str, dict] = {}
        self.logs: dict[str, list[str]] = {}
        self.templates: dict[str, dict] = {}
        self.endpoints: dict[str, dict] = {}
        self.no_capacity = False
        self.no_gpus_on_resume = False
        self.on_volume_created: list = []  # callbacks(volume), e.g. its bucket in an S3 stand-in
        self._created = 0
        self._server = LocalHTTPServer(_handler(self))
        self.url = self._server.url

    def close(self) -> None:
        self._server.close()

    def calls(self, operation: str) -> list[str]:
        return [q for q in self.queries if operation in q]

    # --- GraphQL ---------------------------------------------------------------------------------------------------
    def execute(self, query: str, variables: dict | None) -> tuple[int, dict]:
        try:
            document = parse(query)
        except Exception as exc:  # graphql-core's syntax errors
            return 400, {"errors": [{"message": f"Syntax Error: {exc}"}]}
        if problems := validate(SCHEMA, document):
            return 400, {"errors": [{"message": problem.message} for problem in problems]}
        self.queries.append(query)
        result = graphql_sync(SCHEMA, query, root_value=self, variable_values=variables)
        if result.errors:
            return 200, {"errors": [{"message": str(error.original_error or error.message)}
                                    for error in result.errors], "data": result.data}
        return 200, {"data": result.data}

    def _record(self, operation: str, values: dict) -> dict:
        self.inputs.setdefault(operation, []).append(values)
        return values

    # Query
    def myself(self, info):
        return {"id": "user1", "pubKey": "", "pods": [self._api_pod(p) for p in self.pods.values()],
                "networkVolumes": self.volumes, "podTemplates": list(self.templates.values()),
                "endpoints": list(self.endpoints.values())}

    def pod(self, info, input):
        pod = self.pods.get(input["podId"])
        return self._api_pod(pod) if pod else None

    def gpuTypes(self, info, input=None):  # noqa: N802
        wanted = (input or {}).get("id")
        return [dict(g, securePrice=1.89 if "A100" in g["id"] else 0.69,
                     lowestPrice={"minimumBidPrice": 0.9, "uninterruptablePrice": 1.64})
                for g in GPUS if wanted in (None, g["id"])]

    # Mutation
    def podFindAndDeployOnDemand(self, info, input=None):  # noqa: N802
        values = self._record("podFindAndDeployOnDemand", input or {})
        if self.no_capacity:
            raise GraphQLRejected("There are no longer any instances available with the requested specifications. "
                                  "Please refresh and try again.")
        if values.get("networkVolumeId") and not any(v["id"] == values["networkVolumeId"] for v in self.volumes):
            raise GraphQLRejected("network volume not found")
        self._created += 1
        pod_id = f"pod{self._created}"
        self.pods[pod_id] = {
            "id": pod_id, "name": values["name"], "desiredStatus": "RUNNING", "imageName": values["imageName"],
            "gpuCount": values.get("gpuCount", 1), "gpuTypeId": values["gpuTypeId"],
            "dockerArgs": values.get("dockerArgs", ""), "ports": values.get("ports"),
            "containerDiskInGb": values.get("containerDiskInGb"), "networkVolumeId": values.get("networkVolumeId"),
            "env": {item["key"]: item["value"] for item in values.get("env") or []}, "costPerHr": 1.64,
            "uptimeSeconds": 0,
        }
        return self._api_pod(self.pods[pod_id])

    def podEditJob(self, info, input):  # noqa: N802
        values = self._record("podEditJob", input)
        pod = self._existing(values["podId"])
        for field in ("imageName", "dockerArgs", "ports", "containerDiskInGb"):
            if field in values:
                pod[field] = values[field]
        if "env" in values:
            pod["env"] = {item["key"]: item["value"] for item in values["env"] or []}
        return self._api_pod(pod)

    def podStop(self, info, input):  # noqa: N802
        pod = self._existing(self._record("podStop", input)["podId"])
        pod["desiredStatus"] = "EXITED"
        return self._api_pod(pod)

    def podResume(self, info, input):  # noqa: N802
        pod = self._existing(self._record("podResume", input)["podId"])
        if self.no_gpus_on_resume:
            raise GraphQLRejected("There are not enough free GPUs on the host machine to start this pod.")
        pod["desiredStatus"] = "RUNNING"
        return self._api_pod(pod)

    def podTerminate(self, info, input):  # noqa: N802
        self._existing(self._record("podTerminate", input)["podId"])
        del self.pods[input["podId"]]
        return None

    def createNetworkVolume(self, info, input):  # noqa: N802
        values = self._record("createNetworkVolume", input)
        volume = {"id": f"vol{len(self.volumes) + 1}", "name": values["name"], "size": values["size"],
                  "dataCenterId": values["dataCenterId"]}
        self.volumes.append(volume)
        for callback in self.on_volume_created:
            callback(volume)
        return volume

    def deleteNetworkVolume(self, info, input):  # noqa: N802
        volume_id = self._record("deleteNetworkVolume", input)["id"]
        if any(pod.get("networkVolumeId") == volume_id for pod in self.pods.values()):
            raise GraphQLRejected("the network volume is attached to a pod")
        if any(endpoint.get("networkVolumeId") == volume_id for endpoint in self.endpoints.values()):
            raise GraphQLRejected("the network volume is attached to an endpoint")
        before = len(self.volumes)
        self.volumes = [v for v in self.volumes if v["id"] != volume_id]
        if len(self.volumes) == before:
            raise GraphQLRejected("network volume not found")
        return True

    def saveTemplate(self, info, input=None):  # noqa: N802
        values = dict(self._record("saveTemplate", input or {}))
        template_id = values.pop("id", None)
        if any(t["name"] == values["name"] and t["id"] != template_id for t in self.templates.values()):
            raise GraphQLRejected(f"a template named {values['name']} already exists")
        if template_id is None:
            template_id = f"tpl{len(self.templates) + 1}"
        elif template_id not in self.templates:
            raise GraphQLRejected(f"template {template_id} not found")
        self.templates[template_id] = {**self.templates.get(template_id, {}), **values, "id": template_id}
        return self.templates[template_id]

    def deleteTemplate(self, info, templateName):  # noqa: N802, N803
        self._record("deleteTemplate", {"templateName": templateName})
        template = next((t for t in self.templates.values() if t["name"] == templateName), None)
        if template is None:
            raise GraphQLRejected(f"template {templateName} not found")
        if any(e["templateId"] == template["id"] for e in self.endpoints.values()):
            raise GraphQLRejected("the template is in use by an endpoint")
        del self.templates[template["id"]]
        return None

    def saveEndpoint(self, info, input=None):  # noqa: N802
        values = dict(self._record("saveEndpoint", input or {}))
        endpoint_id = values.pop("id", None)
        template = self.templates.get(values["templateId"])
        if template is None or not template.get("isServerless"):
            raise GraphQLRejected("templateId must name a serverless template")
        if values.get("networkVolumeId") and not any(v["id"] == values["networkVolumeId"] for v in self.volumes):
            raise GraphQLRejected("network volume not found")
        if endpoint_id is None:
            endpoint_id = f"ep{len(self.endpoints) + 1}"
        elif endpoint_id not in self.endpoints:
            raise GraphQLRejected(f"endpoint {endpoint_id} not found")
        self.endpoints[endpoint_id] = {"type": "QB", "workersMin": 0, "workersMax": 3, "idleTimeout": 5,
                                       **self.endpoints.get(endpoint_id, {}), **values, "id": endpoint_id}
        return self.endpoints[endpoint_id]

    def deleteEndpoint(self, info, id):  # noqa: A002
        self._record("deleteEndpoint", {"id": id})
        endpoint = self.endpoints.get(id)
        if endpoint is None:
            raise GraphQLRejected(f"endpoint {id} not found")
        if endpoint["workersMin"] or endpoint["workersMax"]:
            raise GraphQLRejected("an endpoint's min and max workers must both be zero before it is deleted")
        del self.endpoints[id]
        return None

    def _existing(self, pod_id: str) -> dict:
        if pod_id not in self.pods:
            raise GraphQLRejected(f"pod {pod_id} not found")
        return self.pods[pod_id]

    @staticmethod
    def _api_pod(pod: dict) -> dict:
        """The stored pod as the API shows it: env as KEY=value strings, the GPU under `machine`."""
        return dict(pod, env=[f"{k}={v}" for k, v in pod.get("env", {}).items()],
                    machine={"gpuTypeId": pod.get("gpuTypeId"), "gpuDisplayName": pod.get("gpuTypeId"),
                             "podHostId": "h1"},
                    runtime=None, machineId="m1", volumeMountPath="/workspace")


def _handler(stand_in: StandInRunPod):
    class Handler(QuietHandler):
        def do_POST(self):  # noqa: N802
            if not self._authorized():
                return self._send(401, {"errors": [{"message": "Unauthorized"}]})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self._send(*stand_in.execute(body["query"], body.get("variables")))

        def do_GET(self):  # noqa: N802
            url = urlparse(self.path)
            parts = url.path.strip("/").split("/")
            if len(parts) != 4 or parts[:2] != ["v2", "pods"] or parts[3] != "logs":
                return self._send(404, {"title": "not found"})
            if not self._authorized():
                return self._send(401, {"title": "Unauthorized"})
            if parts[2] not in stand_in.pods:
                return self._send(404, {"title": f"pod {parts[2]} not found"})
            tail = int(parse_qs(url.query).get("tail", ["100"])[0])
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            lines = stand_in.logs.get(parts[2], [])
            for n, line in enumerate(lines[-tail:] if tail else []):
                event = {"ts": f"2026-12-02T00:00:{n:02d}Z", "source": "container", "line": line}
                self.wfile.write(f"id: {event['ts']}\ndata: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
            time.sleep(10)  # a live stream: it stays open for new lines

        def _authorized(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {stand_in.api_key}"

        def _send(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler
