"""Audit files: one append-only ``.audit`` file per session (records: core/ledger.py).

A step's frame is written to its file (the page cache) before the step's verdict is
released: no token without its frame. ``fsync`` runs off the step path, in one syncer
thread, per ``audit.fsync``: ``every_frame`` (as soon as the thread gets to it),
``interval`` (every ``fsync_every_frames`` frames or ``fsync_interval_ms``), or ``close``
only; closing a session always syncs its file. A write that fails (disk full, the file
cannot grow, an I/O error) is cut back to the last whole frame and raises
:class:`AuditError`; the service turns that step into an ABORT naming the audit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from pathlib import Path
from typing import Any

from .config import AuditConfig
from .core import ledger
from .errors import AuditError


class SessionAudit:
    """The open ``.audit`` file of one session opening."""

    def __init__(self, path: Path, syncer: Syncer) -> None:
        self.path = path
        self._syncer = syncer
        try:
            # O_EXCL: an opening never appends to another opening's file.
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot create audit file {path}: {exc.strerror}") from None
        self._size = 0
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self._count = threading.Lock()  # _unsynced: the step path against the syncer (never held across I/O)
        self._syncing = threading.Lock()  # one fsync at a time, and none while the file closes
        self.broken: str = ""
        self.unsigned = 0  # frames since the last signed checkpoint
        self.last_checkpoint_ns = time.time_ns()

    def append(self, record: dict[str, Any]) -> None:
        """Write one record whole, or raise AuditError and leave the file as it was."""
        if self.broken:
            raise AuditError(f"audit file {self.path} failed earlier: {self.broken}")
        assert self._fd is not None
        line = ledger.encode(record)
        try:
            n = os.write(self._fd, line)
            if n != len(line):
                raise OSError(errno.ENOSPC, f"short write ({n} of {len(line)} bytes)")
        except OSError as exc:
            why = exc.strerror or str(exc)
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)  # no half frame left behind
            self.broken = why
            raise AuditError(f"cannot write audit file {self.path}: {why}") from None
        self._size += n
        with self._count:
            self._unsynced += 1
        self._syncer.wrote(self)

    def checkpoint_due(self, cfg: AuditConfig, now_ns: int) -> bool:
        """After a frame: whether the file is owed a signed checkpoint."""
        self.unsigned += 1
        late = now_ns - self.last_checkpoint_ns >= cfg.checkpoint_interval_ms * 1e6
        return self.unsigned >= cfg.checkpoint_every_frames or late

    def checkpointed(self, now_ns: int) -> None:
        self.unsigned, self.last_checkpoint_ns = 0, now_ns

    def due(self, cfg: AuditConfig, now: float) -> bool:
        if not self._unsynced:
            return False
        if cfg.fsync == "every_frame":
            return True
        if cfg.fsync == "interval":
            return self._unsynced >= cfg.fsync_every_frames or (now - self._last_sync) * 1e3 >= cfg.fsync_interval_ms
        return False

    def sync(self) -> None:
        with self._syncing:
            with self._count:
                pending, self._unsynced = self._unsynced, 0
                self._last_sync = time.monotonic()
            if self._fd is not None and pending:
                with contextlib.suppress(OSError):  # a failed sync loses at most this tail on a power cut
                    os.fsync(self._fd)

    def close(self) -> None:
        """Sync and close (blocking: call it off the event loop)."""
        self._syncer.forget(self)
        self.sync()
        with self._syncing:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class Syncer:
    """The one thread that fsyncs audit files, so no step waits for a disk."""

    def __init__(self, cfg: AuditConfig) -> None:
        self.cfg = cfg
        self._dirty: set[SessionAudit] = set()
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="fse-audit-sync", daemon=True)
        self._thread.start()

    def wrote(self, log: SessionAudit) -> None:
        if self.cfg.fsync == "close":
            return
        with self._cv:
            self._dirty.add(log)
            if log.due(self.cfg, time.monotonic()):
                self._cv.notify()

    def forget(self, log: SessionAudit) -> None:
        with self._cv:
            self._dirty.discard(log)

    def _run(self) -> None:
        period = self.cfg.fsync_interval_ms / 1e3 if self.cfg.fsync == "interval" else None
        while True:
            with self._cv:
                now = time.monotonic()
                due = [log for log in self._dirty if log.due(self.cfg, now)]
                if not due and not self._stop:
                    self._cv.wait(timeout=period)
                    continue
                for log in due:
                    self._dirty.discard(log)
                if self._stop and not due:
                    return
            for log in due:
                log.sync()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(5)


class AuditDir:
    """Where a sidecar's audit files go; one :class:`SessionAudit` per session opening."""

    def __init__(self, cfg: AuditConfig) -> None:
        assert cfg.dir is not None
        self.cfg = cfg
        self.dir = cfg.dir
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise AuditError(f"audit.dir {self.dir}: {exc.strerror}") from None
        self.syncer = Syncer(cfg)

    def open(self, session_id: str, opening_nonce: bytes, genesis: dict[str, Any]) -> SessionAudit:
        """A new file for this opening (a session id opened again gets another file)."""
        log = SessionAudit(self.dir / f"{session_id}.{opening_nonce.hex()[:16]}.audit", self.syncer)
        try:
            log.append(genesis)
        except AuditError:
            log.close()
            with contextlib.suppress(OSError):
                log.path.unlink()
            raise
        return log

    def close(self) -> None:
        self.syncer.stop()
