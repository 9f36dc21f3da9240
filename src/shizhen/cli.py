"""`shizhen serve | build-tiny-checkpoint`. Settings come from the environment, overridden by `serve`'s flags."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from .config import Settings
from .observability.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shizhen", description="Serve ShizhenGPT behind an OpenAI-compatible API.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the API server (flags: shizhen serve --help)", add_help=False)
    commands.add_parser("download", help="fetch the model into the cache (settings as for serve)", add_help=False)
    verify = commands.add_parser("verify", help="check the cached model, repairing what is wrong", add_help=False)
    verify.add_argument("--full", action="store_true", help="also check every file's SHA-256")
    deploy = commands.add_parser("deploy", help="RunPod: up | status | stop | start | down | logs")
    deploy.add_argument("action", choices=["up", "status", "stop", "start", "down", "logs"])
    deploy.add_argument("--recreate", action="store_true", help="start: recreate the pod if its host has no GPU")
    deploy.add_argument("--delete-volume", action="store_true", help="down: also delete the volume and its model")
    deploy.add_argument("--tail", type=int, default=200, help="logs: how many past lines (at most 5000)")
    deploy.add_argument("--follow", action="store_true", help="logs: keep streaming new lines")
    commands.add_parser("cost", help="what the pod costs: testing, 12 h/day, 24/7")
    tiny = commands.add_parser("build-tiny-checkpoint", help="write a tiny random-weight Qwen2.5-VL checkpoint")
    tiny.add_argument("target", type=Path)
    args, rest = parser.parse_known_args(argv)
    if args.command == "build-tiny-checkpoint":
        from .tiny_checkpoint import build_tiny_checkpoint

        print(build_tiny_checkpoint(args.target))
        return 0
    if args.command in ("deploy", "cost"):
        return deploy_command(args, rest)
    if args.command in ("download", "verify"):
        return store_command(args.command, load_settings(rest), full=getattr(args, "full", False))
    return serve(rest)


def deploy_command(args, rest: list[str]) -> int:
    """RunPod commands; the server's settings (model, keys, CORS, auto-stop) come from the same environment."""
    from .deploy import commands
    from .deploy.runpod_client import DeployError, RunPodClient
    from .deploy.settings import DeploySettings

    logging.getLogger("httpx").setLevel(logging.WARNING)  # its per-request INFO lines would break the progress line
    deploy, server = DeploySettings(), load_settings(rest)
    try:
        if args.command == "cost":
            return commands.cost(deploy, RunPodClient() if _has_runpod_key() else None)
        client = RunPodClient()
        if args.action == "logs":
            return commands.logs(deploy, client, tail=args.tail, follow=args.follow)
        if args.action == "up":
            return commands.up(deploy, server, client)
        if args.action == "status":
            return commands.status(deploy, client)
        if args.action == "stop":
            return commands.stop(deploy, client)
        if args.action == "start":
            return commands.start(deploy, server, client, recreate=args.recreate)
        return commands.down(deploy, client, delete_volume=args.delete_volume)
    except DeployError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1


def _has_runpod_key() -> bool:
    import os

    import runpod

    return bool(os.environ.get("RUNPOD_API_KEY") or runpod.api_key)


def store_command(command: str, settings: Settings, full: bool) -> int:
    """`download`: fetch what is missing and verify; `verify`: check (fast, or --full hashes) and repair once."""
    from .store import StoreError, model_store

    configure_logging(settings.log_level, settings.log_json)
    store = model_store(settings)
    try:
        if command == "download":
            print(store.ensure())
        else:
            problems = store.repair(full=full)
            print("repaired: " + "; ".join(f"{p.name} ({p.reason})" for p in problems) if problems else "ok")
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def load_settings(cli_args: list[str]) -> Settings:
    """Settings from env and flags; an invalid value exits with a message naming the setting."""
    try:
        return Settings(_cli_parse_args=cli_args, _cli_prog_name="shizhen serve")
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]) or "settings"
            flag = name.replace("_", "-")
            problems.append(f"  {name} (SHIZHEN_{name.upper()} / --{flag}): {error['msg']}")
        sys.exit("invalid settings:\n" + "\n".join(problems))


def demo_checkpoint(settings: Settings) -> Path:
    """The tiny random checkpoint `--demo` serves, built once into the cache."""
    from .tiny_checkpoint import build_tiny_checkpoint

    folder = (settings.cache_dir or Path.home() / ".cache" / "shizhen") / "demo-tiny-random"
    if not (folder / "model.safetensors").exists():
        build_tiny_checkpoint(folder)
    return folder


def serve(cli_args: list[str]) -> int:
    settings = load_settings(cli_args)
    configure_logging(settings.log_level, settings.log_json)
    import uvicorn

    from .api.app import create_app
    from .api.shutdown import DrainingServer

    source = str(demo_checkpoint(settings)) if settings.demo else None
    app = create_app(settings, model_source=source)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            log_config=None, timeout_graceful_shutdown=5)
    DrainingServer(config, app, settings.shutdown_grace_seconds).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
