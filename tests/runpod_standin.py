"""A local stand-in for RunPod's GraphQL API (the SDK reads RUNPOD_API_BASE_URL): it answers the queries and
mutations the `runpod` SDK and the deploy kit send, records them, and plays scenarios."""

from __future__ import annotations

import json
import re

from local_http import LocalHTTPServer, QuietHandler

GPUS = [
    {"id": "NVIDIA A100 80GB PCIe", "displayName": "A100 80GB PCIe", "memoryInGb": 80},
    {"id": "NVIDIA H100 80GB HBM3", "displayName": "H100 80GB", "memoryInGb": 80},
    {"id": "NVIDIA GeForce RTX 4090", "displayName": "RTX 4090", "memoryInGb": 24},
    {"id": "NVIDIA RTX A4000", "displayName": "RTX A4000", "memoryInGb": 16},
]


class StandInRunPod:
    def __init__(self, api_key: str = "rp-test-key"):
        self.api_key = api_key
        self.queries: list[str] = []
        self.volumes: list[dict] = []
        self.pods: dict[str, dict] = {}
        self.no_capacity = False
        self.no_gpus_on_resume = False
        self._created = 0
        stand_in = self

        class Handler(QuietHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("Authorization") != f"Bearer {stand_in.api_key}":
                    return self._send(401, {"errors": [{"message": "Unauthorized"}]})
                stand_in.queries.append(body["query"])
                self._send(200, stand_in.answer(body["query"]))

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = LocalHTTPServer(Handler)
        self.url = self._server.url

    def close(self) -> None:
        self._server.close()

    def calls(self, operation: str) -> list[str]:
        return [q for q in self.queries if operation in q]

    def answer(self, query: str) -> dict:
        if "podFindAndDeployOnDemand" in query:
            if self.no_capacity:
                return {"errors": [{"message": "There are no longer any instances available with the requested "
                                               "specifications. Please refresh and try again."}]}
            self._created += 1
            pod_id = f"pod{self._created}"
            name = re.search(r'name: "([^"]*)"', query)[1]
            self.pods[pod_id] = {"id": pod_id, "name": name, "desiredStatus": "RUNNING", "gpuCount": 1,
                                 "costPerHr": 1.64, "uptimeSeconds": 0, "machine": {"gpuDisplayName": "A100 80GB PCIe"}}
            return {"data": {"podFindAndDeployOnDemand": {"id": pod_id, "imageName": "", "env": [],
                                                          "machineId": "m1", "machine": {"podHostId": "h1"}}}}
        if "gpuTypes(input" in query:
            gpu_id = re.search(r'id: "([^"]*)"', query)[1]
            found = [dict(g, securePrice=1.89 if "A100" in g["id"] else 0.69,
                          lowestPrice={"minimumBidPrice": 0.9, "uninterruptablePrice": 1.64})
                     for g in GPUS if g["id"] == gpu_id]
            return {"data": {"gpuTypes": found}}
        if "gpuTypes" in query:
            return {"data": {"gpuTypes": GPUS}}
        if "createNetworkVolume" in query:
            volume = {"id": f"vol{len(self.volumes) + 1}", "name": re.search(r'name: "([^"]*)"', query)[1],
                      "size": int(re.search(r"size: (\d+)", query)[1]),
                      "dataCenterId": re.search(r'dataCenterId: "([^"]*)"', query)[1]}
            self.volumes.append(volume)
            return {"data": {"createNetworkVolume": volume}}
        if "networkVolumes" in query:
            return {"data": {"myself": {"id": "user1", "pubKey": "", "networkVolumes": self.volumes}}}
        if "myPods" in query:
            return {"data": {"myself": {"pods": list(self.pods.values())}}}
        if "pod(input" in query:
            return {"data": {"pod": self.pods.get(re.search(r'podId: "([^"]*)"', query)[1])}}
        pod_id = (re.search(r'podId: "([^"]*)"', query) or [None, None])[1]
        if "podStop" in query:
            self.pods[pod_id]["desiredStatus"] = "EXITED"
            return {"data": {"podStop": {"id": pod_id, "desiredStatus": "EXITED"}}}
        if "podResume" in query:
            if self.no_gpus_on_resume:
                return {"errors": [{"message": "There are not enough free GPUs on the host machine to start this "
                                               "pod."}]}
            self.pods[pod_id]["desiredStatus"] = "RUNNING"
            return {"data": {"podResume": {"id": pod_id, "desiredStatus": "RUNNING", "imageName": "", "env": [],
                                           "machineId": "m1", "machine": {"podHostId": "h1"}}}}
        if "podTerminate" in query:
            self.pods.pop(pod_id, None)
            return {"data": {"podTerminate": None}}
        return {"errors": [{"message": f"the stand-in does not know this query: {query[:80]}"}]}
