"""The traffic log (``serve --traffic-log DIR``): one JSON line per answered request, written off
the request path.

The request path only puts a record on a bounded queue (never waiting: a full queue drops it and
counts the drop); one writer thread turns each into one line and hands it to the kernel with a
single ``os.write`` on an ``O_APPEND`` descriptor. So a process killed with SIGKILL leaves whole
lines only and loses nothing that was written, a crash of the writer or a full disk loses records
(counted, warned about once), never a response. Files are ``DIR/traffic-000001.jsonl``, ... , the
next one started past ``max_bytes``. ``close()`` drains the queue (the lifespan's shutdown calls it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import threading
from pathlib import Path
from typing import Any

from edgedistill.serve.metrics import Metrics

log = logging.getLogger("edgedistill.serve.traffic")

QUEUE_SIZE = 10_000  # records waiting for the writer before new ones are dropped
FILE_RE = re.compile(r"^traffic-(\d{6,})\.jsonl$")
_STOP = object()
_os_write = os.write  # one call per record (tests put a failing disk here)


def file_name(index: int) -> str:
    return f"traffic-{index:06d}.jsonl"


def input_sha256(value: Any) -> str:
    """The SHA-256 of an input as canonical JSON (sorted keys, no spaces): the same input, the same hash."""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def with_input(record: dict[str, Any], value: Any, inputs: bool) -> dict[str, Any]:
    """``record`` with ``input`` (``inputs`` on) or only ``input_sha256`` (off)."""
    return {**record, "input": value} if inputs else {**record, "input_sha256": input_sha256(value)}


class TrafficLog:
    """Append-only JSON Lines under ``folder``, rotated past ``max_bytes``, written by one thread."""

    def __init__(self, folder: str | Path, metrics: Metrics, inputs: bool = True, max_bytes: int = 64 << 20):
        self.folder = Path(folder)
        self.metrics = metrics
        self.inputs = inputs
        self.max_bytes = max(1, int(max_bytes))
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_SIZE)
        self.fd: int | None = None
        self.index = 0
        self.size = 0
        self.warned = False
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="traffic-log", daemon=True)
        self.thread.start()

    # ---- the request path ------------------------------------------------------------------------
    def submit(self, record: dict[str, Any]) -> None:
        """Queue one record; never blocks, never raises (a full queue or a closed log drops it, counted)."""
        if self.closed:
            self.metrics.traffic_dropped.inc()
            return
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.metrics.traffic_dropped.inc()

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, then close the file (blocking: call it from a thread in async code)."""
        if self.closed:
            return
        self.closed = True
        self.queue.put(_STOP)  # a full queue: waits for the writer to make room
        self.thread.join(timeout_s)

    # ---- the writer thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is _STOP:
                break
            self._write(item)
        self._reset()

    def _write(self, record: dict[str, Any]) -> None:
        try:
            line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
            fd = self._file_for(len(line))
            before = self.size
            written = _os_write(fd, line)
            if written != len(line):  # a full disk part-way: take the piece back, so only whole lines stay
                os.ftruncate(fd, before)
                raise OSError(f"short write ({written} of {len(line)} bytes)")
            self.size += written
            self.metrics.traffic_records.inc()
        except Exception as e:  # noqa: BLE001 -- any failure loses the record, never the server
            self.metrics.traffic_errors.inc()
            if not self.warned:
                self.warned = True
                log.warning("traffic log %s: a record could not be written (%s); counting the losses, not saying again", self.folder, e)
            self._reset()

    def _file_for(self, length: int) -> int:
        if self.fd is not None and self.size > 0 and self.size + length > self.max_bytes:
            self._reset()
            self.index += 1
        if self.fd is None:
            self._open()
        return self.fd  # type: ignore[return-value]

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.index == 0:  # first open: after the files already there (a restarted server appends)
            self.index = max((int(m.group(1)) for p in self.folder.iterdir() if (m := FILE_RE.match(p.name))), default=1)
        while True:
            fd = os.open(self.folder / file_name(self.index), os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            size = os.fstat(fd).st_size
            if size < self.max_bytes and (size == 0 or os.pread(fd, 1, size - 1) == b"\n"):
                break
            os.close(fd)  # full, or ending in a stray partial line: never write after it
            self.index += 1
        self.fd, self.size = fd, size

    def _reset(self) -> None:
        """Close the current file (if any); the next record opens one again."""
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd = None

