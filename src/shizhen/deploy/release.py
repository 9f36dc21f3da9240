"""What the pod runs: exactly the commit of the checkout `deploy up` ran from, never a name from a public index.

Two routes. By default the checkout's committed tree is built into a wheel here and put on the network volume
through RunPod's S3-compatible API (the volume is the bucket; `s3://VOLUME_ID/path` is `/workspace/path` on the pod).
With `SHIZHEN_DEPLOY_GIT_URL` the pod installs `git+URL@COMMIT` instead, once that commit is on a remote branch.
Either way a tree with uncommitted changes is refused: what runs must be a commit someone can read.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from ..config import Settings
from .runpod_client import DeployError
from .settings import DeploySettings

REPO_ROOT = Path(__file__).resolve().parents[3]  # the checkout `deploy` runs from
POD_VOLUME = "/workspace"  # where a pod mounts the network volume
WORKER_VOLUME = "/runpod-volume"  # where a serverless worker mounts it
RELEASES = "shizhen/releases"  # on the volume


@dataclass(frozen=True)
class Release:
    commit: str
    wheel_key: str | None = None  # the wheel route: its path on the volume (s3://VOLUME_ID/wheel_key)
    git_url: str | None = None  # the git route

    def requirement(self, mount: str) -> str:
        """What pip installs on a machine that mounts the volume at `mount`."""
        return f"{mount}/{self.wheel_key}" if self.wheel_key else f"git+{self.git_url}@{self.commit}"


def prepare_release(deploy: DeploySettings, volume_id: str, data_center: str) -> Release:
    """Check the checkout, then build and upload its wheel (or check the commit is pushed)."""
    repo_root = REPO_ROOT
    commit = checkout_commit(repo_root)
    if deploy.git_url:
        if not _git(repo_root, "branch", "--remotes", "--contains", commit):
            raise DeployError(f"commit {commit[:12]} is on no remote branch: push it first, since the pod installs "
                              f"{deploy.git_url} at that commit")
        return Release(commit, git_url=deploy.git_url)
    with tempfile.TemporaryDirectory(prefix="shizhen-release-") as scratch:
        wheel = build_wheel(repo_root, commit, Path(scratch))
        key = f"{RELEASES}/{commit}/{wheel.name}"
        upload_to_volume(deploy, volume_id, data_center, wheel, key)
    return Release(commit, wheel_key=key)


def container_env(deploy: DeploySettings, server: Settings, release: Release, mount: str,
                  **extra: str) -> dict[str, str]:
    """The env a pod or a serverless worker starts with: where the volume is, what start_pod.sh installs, the
    server's settings; `extra` adds to it. Empty values are left out."""
    env = {
        "WORKSPACE": mount,
        "SHIZHEN_PACKAGE": release.requirement(mount),
        "SHIZHEN_REQUIREMENTS_B64": base64.b64encode((REPO_ROOT / "requirements.txt").read_bytes()).decode(),
        "SHIZHEN_MAX_RESTARTS": str(deploy.max_restarts),
        "SHIZHEN_MODEL": server.model,
        "SHIZHEN_SERVED_MODEL_NAME": server.model_name,
        "SHIZHEN_CACHE_DIR": f"{mount}/models",
        "HF_HOME": f"{mount}/models",
        "SHIZHEN_CORS_ALLOWED_ORIGINS": ",".join(server.cors_allowed_origins),
        "SHIZHEN_REQUIRE_GPU": "true",
        **extra,
    }
    return {key: value for key, value in env.items() if value}


def start_command() -> str:
    """The container's command (RunPod's dockerArgs) for pods and workers alike: start_pod.sh, carried inline, so
    that it exists before anything is installed; it becomes the container's PID 1."""
    script = base64.b64encode((files("shizhen.deploy") / "start_pod.sh").read_bytes()).decode()
    return f"bash -c 'echo {script} | base64 -d > /tmp/start_pod.sh && exec bash /tmp/start_pod.sh'"


def checkout_commit(repo_root: Path) -> str:
    """HEAD of a clean checkout; anything uncommitted (tracked or not, unless ignored) is refused."""
    try:
        commit = _git(repo_root, "rev-parse", "HEAD")
    except DeployError:
        raise DeployError(f"{repo_root} is not a git checkout with a commit: the pod runs a commit") from None
    if changes := _git(repo_root, "status", "--porcelain"):
        listed = ", ".join(line.split(maxsplit=1)[-1] for line in changes.splitlines()[:5])
        raise DeployError(f"the checkout has uncommitted changes ({listed}): commit or stash them, since the pod "
                          "runs exactly a commit")
    return commit


def build_wheel(repo_root: Path, commit: str, scratch: Path) -> Path:
    """The wheel of `commit`'s tree (`git archive`, so nothing outside the commit gets in)."""
    source = scratch / "source"
    archive = scratch / "source.tar"
    _git(repo_root, "archive", "--format=tar", f"--output={archive}", commit)
    with tarfile.open(archive) as tar:
        tar.extractall(source, filter="data")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(scratch / "wheel"), str(source)], capture_output=True, text=True)
    if built.returncode != 0:
        raise DeployError(f"building the wheel of {commit[:12]} failed:\n{built.stderr.strip()[-2000:]}")
    [wheel] = (scratch / "wheel").glob("*.whl")
    return wheel


def upload_to_volume(deploy: DeploySettings, volume_id: str, data_center: str, path: Path, key: str) -> None:
    """Put a file on the network volume through RunPod's S3-compatible API (boto3)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    if not (deploy.s3_access_key_id and deploy.s3_secret_access_key):
        raise DeployError("the pod's code goes onto the volume through RunPod's S3 API: set "
                          "SHIZHEN_DEPLOY_S3_ACCESS_KEY_ID and SHIZHEN_DEPLOY_S3_SECRET_ACCESS_KEY (RunPod console, "
                          "Settings, S3 API Keys), or SHIZHEN_DEPLOY_GIT_URL to install a pushed commit instead")
    endpoint = deploy.s3_endpoint_url.format(data_center=data_center.lower())
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=data_center,  # RunPod: the region is the data centre
                      config=Config(s3={"addressing_style": "path"}),  # one host per data centre, volumes as paths
                      aws_access_key_id=deploy.s3_access_key_id,
                      aws_secret_access_key=deploy.s3_secret_access_key.get_secret_value())
    try:
        s3.upload_file(str(path), volume_id, key)
    except (BotoCoreError, ClientError) as exc:
        raise DeployError(f"uploading {path.name} to volume {volume_id} through {endpoint} failed: {exc} (the S3 "
                          f"API serves only some data centres; see README)") from None


def _git(repo_root: Path, *args: str) -> str:
    result = subprocess.run(["git", "-C", str(repo_root), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise DeployError(f"git {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()
