"""Logging set-up: JSON lines when stderr is not a terminal (RunPod's log view, files, collectors), text otherwise."""

from __future__ import annotations

import logging
import os
import sys

from transformers.utils import logging as hf_logging

from pythonjsonlogger.json import JsonFormatter


def configure_logging(level: str, json_lines: bool | None = None) -> None:
    json_lines = not sys.stderr.isatty() if json_lines is None else json_lines
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):  # one format for everything; our access line replaces uvicorn's
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    hf_logging.disable_default_handler()  # transformers' messages through our handler too
    hf_logging.enable_propagation()
    if json_lines:  # progress bars would break the one-JSON-object-per-line contract
        hf_logging.disable_progress_bar()
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
