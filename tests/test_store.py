"""The model store against a stand-in hub: download, resume, retry, verify, repair, refuse, start offline."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import time

import pytest
from hub_standin import StandInHub
from transformers import Qwen2_5_VLForConditionalGeneration

from shizhen.config import Settings
from shizhen.store import NEEDED_FILES, StoreError, model_store
from shizhen.store import RANDOM_MODEL_MARKER

REPO = "shizhen-tests/tiny-vl"


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    """The tiny checkpoint saved in several shards with an index, as the real 32B checkpoint is."""
    from shizhen.tiny_checkpoint import build_tiny_checkpoint

    folder = build_tiny_checkpoint(tmp_path_factory.mktemp("sharded"))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="300KB")
    assert len(list(folder.glob("model-*.safetensors"))) >= 3
    return folder


@pytest.fixture
def hub(sharded_checkpoint):
    stand_in = StandInHub(REPO, sharded_checkpoint)
    yield stand_in
    stand_in.close()


def _settings(hub, tmp_path, **overrides) -> Settings:
    return Settings(model=REPO, cache_dir=tmp_path / "models", hf_endpoint=hub.url, download_backoff_seconds=0.05,
                    **overrides)


def _shards(hub) -> list[str]:
    return sorted(name for name in hub.files if name.startswith("model-"))


def test_download_then_start_offline_without_touching_the_hub(hub, tmp_path, start_server):
    store = model_store(_settings(hub, tmp_path))
    folder = store.ensure()
    assert sorted(p.name for p in folder.iterdir()) == sorted(set(hub.files) - {RANDOM_MODEL_MARKER})
    assert store.manifest_path.exists()
    requests_before = len(hub.requests)
    server = start_server(model=REPO, cache_dir=str(tmp_path / "models"), hf_endpoint=hub.url, require_gpu=False)
    assert server.wait_ready()["status"] == "ok"
    assert len(hub.requests) == requests_before, "a complete, verified cache must start without the network"
    hub.close()  # and with no hub at all
    second = start_server(model=REPO, cache_dir=str(tmp_path / "models"), hf_endpoint=hub.url, require_gpu=False)
    assert second.wait_ready()["status"] == "ok"


def test_a_dropped_connection_resumes_the_file(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # the hub client keeps what arrived in whole chunks of 10 MiB; 16 KiB chunks let a tiny shard show the resume
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    shard = _shards(hub)[0]
    hub.drop_once[shard] = 50_000
    store = model_store(_settings(hub, tmp_path))
    store.ensure()
    ranges = [r for method, path, r in hub.requests if method == "GET" and path.endswith(shard) and r]
    assert ranges == [f"bytes={3 * 16 * 1024}-"]  # the three whole chunks before the cut are kept
    assert store.verify(store._read_manifest(), full=True) == []


def test_503s_are_retried_with_backoff(hub, tmp_path):
    hub.fail_next = 3
    started = time.perf_counter()
    model_store(_settings(hub, tmp_path)).ensure()
    assert time.perf_counter() - started >= 0.05 * (0.5 + 1 + 2)  # three backoffs, doubling, with jitter
    assert [path for _, path, _ in hub.requests[:4]].count(hub.requests[0][1]) == 4


def test_retries_are_bounded_and_name_what_failed(hub, tmp_path):
    hub.fail_next = 100
    with pytest.raises(StoreError, match="after 3 attempt"):
        model_store(_settings(hub, tmp_path, download_attempts=3)).ensure()


def test_full_verify_finds_corrupt_bytes_and_repairs_them(hub, tmp_path):
    settings = _settings(hub, tmp_path)
    shard = _shards(hub)[1]
    hub.corrupt[shard] = 1  # same length, wrong bytes: only the SHA-256 can tell
    store = model_store(settings)
    store.ensure()
    problems = store.repair(full=True)
    assert [(p.name, p.reason) for p in problems] == [(shard, "SHA-256 differs from the hub's")]
    assert store.verify(store._read_manifest(), full=True) == []


def test_a_file_that_stays_wrong_stops_start_up(hub, tmp_path):
    store = model_store(_settings(hub, tmp_path))
    store.ensure()
    shard = _shards(hub)[0]
    (store.snapshot_dir(store._read_manifest()) / shard).resolve().write_bytes(b"\xff" * 100)
    hub.files[shard] = b"\xff" * 100  # the hub now serves the same broken bytes
    hub.advertised_size[shard] = 100
    with pytest.raises(StoreError, match=f"still wrong after a repair: {shard}: 100 bytes, expected"):
        model_store(_settings(hub, tmp_path)).ensure()


def test_missing_and_truncated_shards_are_fetched_again_at_start(hub, tmp_path, start_server):
    store = model_store(_settings(hub, tmp_path))
    store.ensure()
    folder = store.snapshot_dir(store._read_manifest())
    missing, truncated = _shards(hub)[:2]
    (folder / missing).resolve().unlink()
    blob = (folder / truncated).resolve()
    blob.write_bytes(blob.read_bytes()[:1000])
    server = start_server(model=REPO, cache_dir=str(tmp_path / "models"), hf_endpoint=hub.url, require_gpu=False)
    assert server.wait_ready()["status"] == "ok"
    refetched = {path.rsplit("/", 1)[1] for method, path, _ in hub.requests if method == "GET" and "resolve" in path}
    assert {missing, truncated} <= refetched
    assert store.verify(store._read_manifest(), full=True) == []


def test_not_enough_disk_is_a_clear_error(hub, tmp_path):
    hub.advertised_size[_shards(hub)[0]] = 10**16
    with pytest.raises(StoreError, match=r"not enough disk space .* needs \d+\.\d GiB .* free"):
        model_store(_settings(hub, tmp_path)).ensure()
    assert not any(method == "GET" and "resolve" in path for method, path, _ in hub.requests)


def test_download_and_verify_commands(hub, tmp_path):
    env = {**os.environ, "SHIZHEN_MODEL": REPO, "SHIZHEN_CACHE_DIR": str(tmp_path / "models"), "HF_ENDPOINT": hub.url,
           "HF_TOKEN": "hf_secret_token_value"}
    download = subprocess.run([sys.executable, "-m", "shizhen.cli", "download"], env=env, capture_output=True,
                              text=True, timeout=120)
    assert download.returncode == 0, download.stderr
    assert download.stdout.strip().endswith(hub.commit)
    assert "hf_secret_token_value" not in download.stdout + download.stderr
    model_requests = [auth for (_, path, _), auth in zip(hub.requests, hub.authorizations)
                      if path.startswith(("/api/models/", f"/{REPO}/resolve/"))]
    assert set(model_requests) == {"Bearer hf_secret_token_value"}  # the token goes with every model request
    verify = subprocess.run([sys.executable, "-m", "shizhen.cli", "verify", "--full"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert verify.returncode == 0 and verify.stdout.strip() == "ok", verify.stderr


def test_health_shows_download_progress_while_the_server_waits(hub, tmp_path, start_server):
    import threading

    last_shard = _shards(hub)[-1]
    hub.stall[last_shard] = threading.Event()
    server = start_server(wait=False, model=REPO, cache_dir=str(tmp_path / "models"), hf_endpoint=hub.url,
                          require_gpu=False)
    try:
        with server.client() as http:
            deadline = time.monotonic() + 20
            while last_shard not in (phase := http.get("/health").json().get("phase", "")):
                assert time.monotonic() < deadline, phase
                time.sleep(0.05)
            health = http.get("/health").json()
        assert phase.startswith(f"downloading {last_shard}: ") and "GiB (" in phase
        assert health["step"] == "downloading"
        download = health["download"]
        assert download["file"] == last_shard and 0 < download["done_bytes"] < download["total_bytes"]
        assert download["total_bytes"] == sum(len(data) for name, data in hub.files.items()
                                              if any(fnmatch.fnmatch(name, p) for p in NEEDED_FILES))
    finally:
        hub.stall[last_shard].set()
    assert server.wait_ready()["status"] == "ok"
