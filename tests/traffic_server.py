"""A real uvicorn server process on loopback around the fake numpy model, run the way
``edgedistill serve`` runs its app (``uvicorn.run``, SIGTERM: the lifespan's shutdown), for the
tests that kill a server: ``python -m tests.traffic_server PORT [serve flags as KEY=VALUE ...]``."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import uvicorn
from edgedistill.serve.app import create_app
from edgedistill.serve.artifact import Artifact
from edgedistill.serve.engine import Engine
from edgedistill.serve.settings import Settings

from edgedistill.task import Task
from tests.serve_fakes import FakeRunner

LABELS = ["card_arrival", "card_linking", "exchange_rate"]


def script(prompt: str) -> tuple[str, float]:
    return ("exchange_rate", 20.0) if "rate" in prompt else ("card_arrival", 0.5)


def slow_disk(delay_s: float) -> None:
    """Each record's write takes ``delay_s``: a backlog builds up, that a shutdown must drain."""
    from edgedistill.serve import traffic

    real = traffic._os_write

    def write(fd: int, data: bytes) -> int:
        time.sleep(delay_s)
        return real(fd, data)

    traffic._os_write = write


def main(argv: list[str]) -> None:
    if delay := float(os.environ.get("TRAFFIC_TEST_WRITE_DELAY_S", "0")):
        slow_disk(delay)
    port, flags = int(argv[0]), dict(a.split("=", 1) for a in argv[1:])
    s = Settings.load(artifact="unused.gguf", model_alias="fake-student", n_threads=1, port=port, **flags)
    task = Task(name="intents", type="classification", instructions="Classify the banking query.", labels=LABELS)
    art = Artifact(name="fake-student", format="gguf", model_path=Path("unused.gguf"), task=task)
    app = create_app(s, engine=Engine(FakeRunner(script, delay_s=0.001), max_queue=s.max_queue), artifact=art)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main(sys.argv[1:])
