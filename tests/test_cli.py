"""The command line and settings a new user meets: help that tells the truth, typos caught, paths that exist, and
the README's examples run as written against what the README says to run first."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port, serve_cli, tongue_photo, wait_healthy

from shizhen.cli import load_settings

README = Path(__file__).resolve().parent.parent / "README.md"


def shizhen(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "shizhen.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def test_each_command_has_its_own_help_written_for_people():
    serve = shizhen("serve", "--help").stdout
    assert "usage: shizhen serve" in serve
    for title in ("the model:", "the engine:", "HTTP:", "protection and cost control:", "images:"):
        assert title in serve
    assert "[SHIZHEN_MAX_CONTEXT_LENGTH; default: 8192]" in re.sub(r"\s+", " ", serve).replace("[ ", "[")
    assert "SHIZHEN_CACHE_DIR or HF_HOME" in serve and "--api-keys A,B" in serve
    assert "default factory" not in serve and "dict[" not in serve and "SecretStr" not in serve
    download = shizhen("download", "--help").stdout
    assert "usage: shizhen download" in download and "--cache-dir" in download and "--max-num-seqs" not in download
    verify = shizhen("verify", "--help").stdout
    assert "usage: shizhen verify" in verify and "--full" in verify and "SHA-256" in verify
    deploy = shizhen("deploy", "--help").stdout
    for action in ("up", "status", "stop", "start", "down", "logs"):
        assert re.search(rf"^\s+{action}\s+\S", deploy, re.M), action
    up = shizhen("deploy", "up", "--help").stdout
    assert "Ship this checkout's commit" in up and "SHIZHEN_DEPLOY_GPU_TYPE (default: NVIDIA A100 80GB PCIe)" in up


def test_a_mistyped_flag_is_one_line_with_a_close_match():
    typo = shizhen("serve", "--max-context-lenght", "4096")
    assert typo.returncode == 2
    assert typo.stderr.strip().splitlines() == [
        "shizhen serve: unknown flag --max-context-lenght (did you mean --max-context-length?); "
        "see shizhen serve --help"]


def test_unknown_shizhen_variables_are_warned_about_with_the_close_match(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SHIZHEN_API_KEY", "secret")  # the natural typo: the server would run without keys
    (tmp_path / ".env").write_text("SHIZHEN_MAX_CONTEXT_LENGHT=4096\nSHIZHEN_PORT=8001\n")
    settings = load_settings({})
    err = capsys.readouterr().err
    assert "SHIZHEN_API_KEY is not a setting and is ignored; did you mean SHIZHEN_API_KEYS?" in err
    assert "SHIZHEN_MAX_CONTEXT_LENGHT (in .env) is not a setting" in err and "SHIZHEN_MAX_CONTEXT_LENGTH?" in err
    assert "SHIZHEN_PORT" not in err and settings.port == 8001 and not settings.api_keys


def test_list_settings_take_json_and_settings_errors_name_the_format(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SHIZHEN_API_KEYS", '["a", "b"]')
    assert [key.get_secret_value() for key in load_settings({}).api_keys] == ["a", "b"]
    wrong = shizhen("serve", "--max-memory", "75GiB", cwd=tmp_path)
    assert wrong.returncode == 1
    assert "--max-memory): expected DEVICE=SIZE pairs, e.g. 0=75GiB" in wrong.stderr


def test_a_missing_model_folder_is_no_such_folder_not_a_hub_id(tmp_path):
    for missing in (str(tmp_path / "models" / "7b"), "./models/7b"):
        result = shizhen("serve", "--model", missing, "--port", str(free_port()), cwd=tmp_path)
        assert result.returncode == 1 and f"no such folder: {missing}" in result.stderr
        assert "Repo id" not in result.stderr and "Connection" not in result.stderr


def test_a_taken_port_fails_before_the_model_loads(tiny_checkpoint, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = shizhen("serve", "--model", str(tiny_checkpoint), "--host", "127.0.0.1", "--port", str(port),
                         "--no-log-json", cwd=tmp_path)
    assert result.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "loading" not in result.stderr  # nothing was loaded


def test_a_model_that_cannot_load_exits_1_unless_asked_to_stay_up(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    port = free_port()
    result = shizhen("serve", "--model", str(broken), "--host", "0.0.0.0", "--port", str(port), "--no-log-json",
                     cwd=tmp_path)
    assert result.returncode == 1
    assert "no API keys (SHIZHEN_API_KEYS): anyone who reaches 0.0.0.0" in result.stderr
    assert "the model could not be loaded" in result.stderr and "exiting with code 1" in result.stderr
    staying = serve_cli(["--model", str(broken), "--host", "127.0.0.1", "--port", str(port),
                         "--stay-up-on-load-failure"])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health")
                if health.json()["status"] == "failed":
                    break
            except httpx.HTTPError:
                pass
            assert staying.poll() is None and time.monotonic() < deadline, "it should stay up, failed"
            time.sleep(0.1)
        assert health.status_code == 503 and "config.json" in health.json()["error"]
    finally:
        staying.terminate()
        staying.communicate(timeout=30)


def _readme_block(language: str, containing: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)
    return next(block for block in blocks if containing in block)


@pytest.mark.timeout(300)
def test_the_readme_examples_work_against_serve_demo_as_written(tmp_path):
    port = free_port()
    process = serve_cli(["--demo", "--host", "127.0.0.1", "--port", str(port)], {"SHIZHEN_CACHE_DIR": str(tmp_path)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        curl = _readme_block("bash", "curl http://localhost:8000/v1/chat/completions")
        answered = subprocess.run(["bash", "-c", curl.replace("http://localhost:8000", url)], capture_output=True,
                                  text=True, timeout=60)
        assert answered.returncode == 0 and '"object":"chat.completion"' in answered.stdout, answered.stdout
        tongue_photo().save(tmp_path / "tongue.jpg")
        python = _readme_block("python", "openai.OpenAI").replace("http://localhost:8000", url)
        answered = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, timeout=60,
                                  cwd=tmp_path)
        assert answered.returncode == 0, answered.stderr
    finally:
        process.terminate()
        process.communicate(timeout=30)
