"""One writer per run folder: an exclusive lock that train, resume and export take (issue 12).

The lock is ``RUN/.lock``, held with ``flock(LOCK_EX | LOCK_NB)`` for as long as the writer runs.
The kernel drops an ``flock`` when its process dies, however it dies (SIGKILL included), so a lock
can never outlive its holder; the file's content (PID, host, start time) only serves the messages.

* A second writer fails at once: ``runs/x is being trained by PID 1234 on host h since 09:01; wait
  for it or stop it``.
* A writer that finds the lock free but the file naming another process (its holder died without
  releasing it) takes it over with a one-line warning naming that process.

The file is emptied, never deleted, on release: deleting it would let a third process lock a new
file while a second one still holds the old inode. Readers (sample, eval) take no lock. POSIX only
(fcntl); where ``flock`` is missing the lock is a no-op with a warning.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

from genlab.errors import GenlabError

LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class RunLocked(GenlabError):
    """Another live process is writing to the run folder."""


def _holder_text(holder: dict) -> str:
    since = time.strftime("%H:%M", time.localtime(holder.get("since", 0)))
    return f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')} since {since}"


def _read_holder(f) -> dict | None:
    f.seek(0)
    try:
        holder = json.loads(f.read() or "null")
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


class RunLock:
    """Exclusive writer lock on a run folder; a context manager (``with RunLock(run_dir, "trained"):``)."""

    def __init__(self, run_dir: str | os.PathLike, action: str = "trained"):
        self.run_dir = Path(run_dir)
        self.action = action  # the verb of the message: "runs/x is being <action> by PID ..."
        self._file = None
        self._created_dir = False

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunLocked naming the holder; take over a dead holder's lock with a warning."""
        if fcntl is None:
            warnings.warn("run-folder locks need POSIX flock; two writers to one run folder are not prevented here")
            return self
        self._created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.run_dir / LOCK_FILE, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(f) or {}
            f.close()
            raise RunLocked(f"{self.run_dir} is being {holder.get('action', self.action)} by {_holder_text(holder)}; "
                            "wait for it or stop it") from None
        previous = _read_holder(f)
        if previous and previous.get("pid") != os.getpid():
            warnings.warn(f"{self.run_dir}: took over the lock left by {_holder_text(previous)}, "
                          "which is no longer running", stacklevel=2)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                            "action": self.action}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        """Empty the lock file and unlock it (never delete it: see the module docstring)."""
        if self._file is None:
            return
        f, self._file = self._file, None
        f.seek(0)
        f.truncate()
        f.flush()
        if self._created_dir and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
            try:  # a writer that failed before writing anything leaves no folder behind
                (self.run_dir / LOCK_FILE).unlink()
                self.run_dir.rmdir()
            except OSError:
                pass
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
