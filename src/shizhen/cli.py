"""`shizhen serve | build-tiny-checkpoint`. Settings come from the environment, overridden by `serve`'s flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from .config import Settings
from .observability.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shizhen", description="Serve ShizhenGPT behind an OpenAI-compatible API.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the API server (flags: shizhen serve --help)", add_help=False)
    tiny = commands.add_parser("build-tiny-checkpoint", help="write a tiny random-weight Qwen2.5-VL checkpoint")
    tiny.add_argument("target", type=Path)
    args, rest = parser.parse_known_args(argv)
    if args.command == "build-tiny-checkpoint":
        from .tiny_checkpoint import build_tiny_checkpoint

        print(build_tiny_checkpoint(args.target))
        return 0
    return serve(rest)


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
