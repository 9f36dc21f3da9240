"""Fixtures: the tiny checkpoint (built offline once per run) and real servers on real ports.

Servers run uvicorn in a background thread of the test process; their engine processes are forked from it, so a
test patches engine code before it starts a server to inject faults. `serve_cli` starts the real `shizhen serve`
command in a subprocess.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from shizhen.api.app import create_app
from shizhen.engine.prompt import PromptBuilder
from shizhen.config import Settings
from shizhen.tiny_checkpoint import build_tiny_checkpoint
from runpod_standin import StandInRunPod

TEST_LIMITS = dict(
    max_context_length=4096,
    max_tokens_limit=4000,
    max_num_seqs=8,
    default_max_tokens=64,
    image_min_pixels=28 * 28 * 4,
    image_max_pixels=28 * 28 * 64,
)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    app: object
    settings: Settings

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def openai(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=30)

    @property
    def context(self):
        return self.app.state.context

    @property
    def engine(self):
        """The engine client (the engine itself runs in its own process)."""
        return self.context.engine

    def wait_ready(self, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = httpx.get(f"{self.url}/health", timeout=5)
            if response.status_code == 200:
                return response.json()
            if response.json().get("status") == "failed":
                raise RuntimeError(response.json())
            time.sleep(0.02)
        raise TimeoutError("server did not become ready")


@pytest.fixture
def start_server(tiny_checkpoint) -> Iterator:
    """start_server(**settings) → a RunningServer on a free port; all are stopped at the test's end."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(wait: bool = True, **overrides) -> RunningServer:
        values = dict(TEST_LIMITS, model=str(tiny_checkpoint), host="127.0.0.1", port=free_port()) | overrides
        settings = Settings(**values)
        app = create_app(settings)
        server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        running = RunningServer(f"http://127.0.0.1:{settings.port}", app, settings)
        if wait:
            running.wait_ready()
        return running

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def server(start_server) -> RunningServer:
    return start_server()


def serve_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """The real console entry point in a subprocess."""
    return subprocess.Popen(
        [sys.executable, "-m", "shizhen.cli", "serve", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until the server in `process` answers /health with 200 (it must not exit meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "the server did not become healthy"
        time.sleep(0.1)


def children_of(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def image_data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}[fmt]
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def tongue_photo(width: int = 160, height: int = 120) -> Image.Image:
    """A stand-in tongue photo: a pink ellipse with a pale coating on a dark background."""
    from PIL import ImageDraw

    image = Image.new("RGB", (width, height), (40, 20, 20))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.2, height * 0.1, width * 0.8, height * 0.95), fill=(205, 110, 120))
    draw.ellipse((width * 0.35, height * 0.3, width * 0.65, height * 0.7), fill=(235, 225, 215))
    return image


def generate_greedy(checkpoint, messages, images, max_new_tokens) -> tuple[str, int]:
    """The reference: plain `generate` on the request alone, with the server's test pixel bounds."""
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs = {"min_pixels": TEST_LIMITS["image_min_pixels"], "max_pixels": TEST_LIMITS["image_max_pixels"]}
    inputs = processor(text=[text], images=images or None, return_tensors="pt", **(kwargs if images else {}))
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.decode(new_tokens, skip_special_tokens=True), len(new_tokens)


def hold_loading(tiny_checkpoint: Path, folder: Path) -> tuple[Path, threading.Event]:
    """A copy of the checkpoint whose config.json is a FIFO: loading blocks reading it until `release` is set."""
    shutil.copytree(tiny_checkpoint, folder)
    config = (folder / "config.json").read_bytes()
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    release = threading.Event()

    def feed():
        with open(folder / "config.json", "wb") as pipe:  # returns once the loader has opened it to read
            (folder / "config.json").unlink()
            (folder / "config.json").write_bytes(config)  # later reads get a plain file
            release.wait()
            pipe.write(config)

    threading.Thread(target=feed, daemon=True).start()
    return folder, release


class FaultOnce:
    """Makes a function raise `error` once per `arm()`. The switch is a file, so an engine process (forked from
    this one, with the patch) sees it too; patch before starting the server."""

    def __init__(self, switch: Path):
        self._switch = switch

    def arm(self) -> None:
        self._switch.touch()

    def fire(self, error: Exception) -> None:
        try:
            self._switch.unlink()
        except FileNotFoundError:
            return
        raise error


@pytest.fixture
def fault_once(monkeypatch, tmp_path):
    """fault_once("module.Class.method", error) → a FaultOnce wrapping that method."""
    def patch(target: str, error: Exception) -> FaultOnce:
        module_path, class_name, method_name = target.rsplit(".", 2)
        owner = getattr(__import__(module_path, fromlist=[class_name]), class_name)
        original = getattr(owner, method_name)
        fault = FaultOnce(tmp_path / f"fault-{class_name}.{method_name}")

        def faulty(*args, **kwargs):
            fault.fire(error)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, method_name, faulty)
        return fault

    return patch


@pytest.fixture
def received_turns(monkeypatch) -> list:
    """Each prompt's conversation as the model is given it, captured where the prompt is built."""
    seen: list = []
    original = PromptBuilder.build

    def spy(self, turns, *args):
        seen.append(turns)
        return original(self, turns, *args)

    monkeypatch.setattr(PromptBuilder, "build", spy)
    return seen


class ReceivedImages:
    """The images among `received_turns`, in order, read when indexed (the list grows as requests arrive)."""

    def __init__(self, turns: list):
        self._turns = turns

    def _images(self) -> list[Image.Image]:
        return [part for turns in self._turns for turn in turns for part in turn.parts
                if isinstance(part, Image.Image)]

    def __getitem__(self, index):
        return self._images()[index]

    def __len__(self) -> int:
        return len(self._images())


@pytest.fixture
def received_images(received_turns) -> ReceivedImages:
    """The images the model is given (the processor's input)."""
    return ReceivedImages(received_turns)


# --- RunPod: the stand-in API, and a clean checkout for the kit to ship ------------------------------------------
REPO_ROOT = Path(__file__).resolve().parent.parent
GIT_URL = "https://git.example/clinic/shizhen.git"


@pytest.fixture
def runpod_api(monkeypatch):
    stand_in = StandInRunPod()
    monkeypatch.setenv("RUNPOD_API_BASE_URL", stand_in.url)
    monkeypatch.setenv("RUNPOD_API_KEY", stand_in.api_key)
    yield stand_in
    stand_in.close()


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A clean clone of this repository's HEAD (with `origin/main`), as the checkout `deploy up` ships."""
    clone = tmp_path / "checkout"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO_ROOT), str(clone)], check=True)
    monkeypatch.setattr("shizhen.deploy.release.REPO_ROOT", clone)
    return clone


def head(checkout: Path) -> str:
    return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def deploy_env(monkeypatch, tmp_path, checkout):
    """What a person sets before `deploy up` (the pushed-commit route); the proxy address is set per test."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name, value in {"SHIZHEN_DEPLOY_DATA_CENTER": "EU-RO-1", "SHIZHEN_DEPLOY_POLL_SECONDS": "0.05",
                        "SHIZHEN_API_KEYS": "clinic-key", "SHIZHEN_CORS_ALLOWED_ORIGINS": "https://clinic.example",
                        "SHIZHEN_DEPLOY_READY_TIMEOUT_SECONDS": "20", "SHIZHEN_DEPLOY_GIT_URL": GIT_URL}.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def created_pod(runpod_api, index: int = -1) -> tuple[dict, dict[str, str]]:
    """The input of a podFindAndDeployOnDemand call, and its env as a dict."""
    spec = runpod_api.inputs["podFindAndDeployOnDemand"][index]
    return spec, {item["key"]: item["value"] for item in spec["env"]}
