"""`shizhen serve | download | verify | deploy | cost | build-tiny-checkpoint`.

Settings come from `SHIZHEN_*` variables (or `.env`), overridden by the flags of `serve`, `download` and `verify`;
`deploy` and `cost` read the environment only (the server's settings travel to the pod in its env).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from pydantic import ValidationError

from .config import SETTINGS_SECTIONS, Settings
from .flags import Parser, add_settings_flags, environment_names, given_settings, plain_default, unknown_variables, warn

log = logging.getLogger(__name__)
STORE_SETTINGS = ("model", "cache_dir", "hf_endpoint", "hf_token", "download_attempts", "download_backoff_seconds",
                  "log_level", "log_json")
DEPLOY_ACTIONS = {
    "up": "Ship this checkout's commit and create the pod, or bring the existing one to these settings (it says "
          "what changed); then wait until the model answers and print how to call it.",
    "status": "The pod's state, GPU, uptime, $/hour and so far, and its /health.",
    "stop": "Stop the pod. The volume keeps the model (and is still billed).",
    "start": "Resume the stopped pod and wait until it answers.",
    "down": "Terminate the pod; the volume and its cached model stay unless --delete-volume.",
    "logs": "The container's output (start script, install, server) from RunPod's logs API.",
}


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # said by the subcommand's parser, which knows the close matches
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="shizhen", description="Serve ShizhenGPT behind an OpenAI-compatible API, and deploy it "
                                                "to RunPod. Every flag also reads a SHIZHEN_* variable.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    serve_parser = commands.add_parser("serve", help="run the API server", description=(
        "Run the OpenAI-compatible server: the model loads in the background while /health says what it is doing."))
    add_settings_flags(serve_parser, Settings, SETTINGS_SECTIONS)
    serve_parser.set_defaults(run=serve, parser=serve_parser)

    download = commands.add_parser("download", help="fetch the model into the cache, then verify it", description=(
        "Fetch only the files the server needs into SHIZHEN_CACHE_DIR / HF_HOME, resuming partial ones."))
    add_settings_flags(download, Settings, SETTINGS_SECTIONS, only=STORE_SETTINGS)
    download.set_defaults(run=store_command, parser=download)
    verify = commands.add_parser("verify", help="check the cached model, repairing what is wrong", description=(
        "Check the cached model (sizes and safetensors headers; --full: every SHA-256) and fetch again what is "
        "missing or wrong."))
    verify.add_argument("--full", action="store_true", help="also check every file's SHA-256 (reads all 67 GB)")
    add_settings_flags(verify, Settings, SETTINGS_SECTIONS, only=STORE_SETTINGS)
    verify.set_defaults(run=store_command, parser=verify)

    _add_deploy(commands)
    cost = commands.add_parser("cost", help="what a pod or a serverless endpoint costs: testing, 12 h/day, 24/7",
                               description=("GPU, container disk and volume cost of three scenarios on a pod (at "
                                            "RunPod's price when RUNPOD_API_KEY is set), and on serverless workers "
                                            "for a number of consultations a day."))
    cost.add_argument("--consultations-per-day", type=int, default=100, help="for the serverless estimate")
    cost.set_defaults(run=deploy_command, action="cost", parser=cost)
    tiny = commands.add_parser("build-tiny-checkpoint", help="write a tiny random-weight Qwen2.5-VL checkpoint",
                               description="Write the offline tiny random-weight checkpoint the tests and --demo use.")
    tiny.add_argument("target", type=Path, help="folder to write it to")
    tiny.set_defaults(run=build_tiny, parser=tiny)
    return parser


def _add_deploy(commands) -> None:
    from .deploy.settings import DeploySettings

    variables = "\n".join(f"  {environment_names(DeploySettings, name, field)} (default: {plain_default(field)})"
                          f"{': ' + field.description if field.description else ''}"
                          for name, field in DeploySettings.model_fields.items())
    epilog = (f"Needs RUNPOD_API_KEY (or `runpod config`). The server's settings (SHIZHEN_MODEL, SHIZHEN_API_KEYS, "
              f"...) are sent to the pod from this environment. The pod itself:\n{variables}")
    deploy = commands.add_parser("deploy", help="RunPod: up | status | stop | start | down | logs", epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Deploy to a RunPod pod with a persistent volume, and manage it.")
    actions = deploy.add_subparsers(dest="action", required=True, parser_class=Parser, metavar="ACTION")
    for name, description in DEPLOY_ACTIONS.items():
        action = actions.add_parser(name, help=description.split(". ")[0].split(";")[0], description=description,
                                    epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        action.set_defaults(run=deploy_command, parser=action)
        if name == "start":
            action.add_argument("--recreate", action="store_true",
                                help="if RunPod resumes it with zero GPUs: terminate it, create one on the same volume")
        if name == "down":
            action.add_argument("--delete-volume", action="store_true", help="also delete the volume and its model")
        if name in ("up", "status", "stop", "down"):
            action.add_argument("--serverless", action="store_true",
                                help="the serverless load-balancing endpoint instead of the pod")
        if name == "logs":
            action.add_argument("--tail", type=int, default=200, help="how many past lines (at most 5000)")
            action.add_argument("--follow", action="store_true", help="keep streaming new lines")


def load_settings(given: dict) -> Settings:
    """Settings from env and flags; an invalid value exits with a message naming the setting, its variable and
    flag, and the expected format."""
    from .deploy.settings import POD_VARIABLES, DeploySettings

    warn(unknown_variables([Settings, DeploySettings], POD_VARIABLES))
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]) or "settings"
            field = Settings.model_fields.get(name)
            where = f"{environment_names(Settings, name, field)} / --{name.replace('_', '-')}" if field else name
            problems.append(f"  {name} ({where}): {error['msg'].removeprefix('Value error, ')}")
        sys.exit("invalid settings:\n" + "\n".join(problems))


def serve(args: argparse.Namespace) -> int:
    settings = load_settings(given_settings(args, Settings))
    source = None if settings.demo else _model_source(settings.model)
    listening = [_listen(settings.host, port) for port in dict.fromkeys([settings.port, settings.health_port])
                 if port]  # before anything heavy: a taken port fails at once
    from .observability.logs import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    import uvicorn

    from .api.app import create_app
    from .api.shutdown import DrainingServer

    if not settings.api_keys and settings.listens_beyond_this_machine:
        log.warning("no API keys (SHIZHEN_API_KEYS): anyone who reaches %s:%d can use the model", settings.host,
                    settings.port)
    app = create_app(settings, model_source=source or str(demo_checkpoint(settings)))
    config = uvicorn.Config(app, log_level=settings.log_level, log_config=None, timeout_graceful_shutdown=5)
    server = DrainingServer(config, app, settings.shutdown_grace_seconds,
                            exit_on_load_failure=not settings.stay_up_on_load_failure)
    server.run(sockets=listening)
    return server.exit_code


def _model_source(model: str) -> str:
    from .store import StoreError, model_folder

    try:
        folder = model_folder(model)
    except StoreError as exc:
        sys.exit(f"error: {exc}")
    return str(folder) if folder else model


def _listen(host: str, port: int) -> socket.socket:
    listening = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
    except OSError as exc:
        sys.exit(f"error: cannot listen on {host}:{port}: {exc.strerror} (another server there? choose another "
                 "with --port / SHIZHEN_PORT)")
    return listening


def store_command(args: argparse.Namespace) -> int:
    """`download`: fetch what is missing and verify; `verify`: check (fast, or --full hashes) and repair once."""
    from .store import StoreError, model_store

    from .observability.logs import configure_logging

    settings = load_settings(given_settings(args, Settings))
    configure_logging(settings.log_level, settings.log_json)
    try:
        store = model_store(settings)
        if args.command == "download":
            print(store.ensure())
        else:
            problems = store.repair(full=args.full)
            print("repaired: " + "; ".join(f"{p.name} ({p.reason})" for p in problems) if problems else "ok")
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def deploy_command(args: argparse.Namespace) -> int:
    """RunPod commands; the server's settings (model, keys, CORS, auto-stop) come from the same environment."""
    from .deploy import commands
    from .deploy.runpod_client import DeployError, RunPodClient
    from .deploy.settings import DeploySettings

    logging.getLogger("httpx").setLevel(logging.WARNING)  # its per-request INFO lines would break the progress line
    deploy, server = DeploySettings(), load_settings({})
    try:
        if args.action == "cost":
            return commands.cost(deploy, RunPodClient() if _has_runpod_key() else None, args.consultations_per_day)
        client = RunPodClient()
        if args.action == "logs":
            return commands.logs(deploy, client, tail=args.tail, follow=args.follow)
        if args.action == "start":
            return commands.start(deploy, server, client, recreate=args.recreate)
        target = commands  # the pod; the endpoint's module has the same up/status/stop/down
        if args.serverless:
            from .deploy import serverless as target
        if args.action == "up":
            return target.up(deploy, server, client)
        if args.action == "status":
            return target.status(deploy, client)
        if args.action == "stop":
            return target.stop(deploy, client)
        return target.down(deploy, client, delete_volume_too=args.delete_volume)
    except DeployError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1


def _has_runpod_key() -> bool:
    import os

    import runpod

    return bool(os.environ.get("RUNPOD_API_KEY") or runpod.api_key)


def build_tiny(args: argparse.Namespace) -> int:
    from .tiny_checkpoint import build_tiny_checkpoint

    print(build_tiny_checkpoint(args.target))
    return 0


def demo_checkpoint(settings: Settings) -> Path:
    """The tiny random checkpoint `--demo` serves, built once into the cache."""
    from .tiny_checkpoint import build_tiny_checkpoint

    folder = (settings.cache_dir or Path.home() / ".cache" / "shizhen") / "demo-tiny-random"
    if not (folder / "model.safetensors").exists():
        build_tiny_checkpoint(folder)
    return folder


if __name__ == "__main__":
    sys.exit(main())
