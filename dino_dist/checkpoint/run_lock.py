"""One writer per run directory: the lock a run takes before it reads or deletes anything there.

`RUN/owner.lock` is a small JSON file naming the owner: host, pid (and the kernel's start time
of that pid, so a reused pid is not taken for the owner), job (SLURM job id or torchrun run
id), restart count, start time and a token of its own. The owner touches the file every
HEARTBEAT_S seconds (its mtime is the keep-alive) and removes it when the run ends.

A run that finds the file takes it over only when its owner is provably gone:
- a restart of the same job (same SLURM job id or torchrun run id, a higher restart count):
  at once, since the scheduler or torchrun ended the old processes before restarting;
- on this host, the owner's pid is dead (or is now another process): at once;
- on another host, the keep-alive is older than STALE_AFTER_S (a host that died, or a run
  killed there): the file's mtime comes from the shared file system's clock, so hosts whose
  clocks disagree by less than the margin cannot mistake a live owner for a gone one.
Anything else is a live owner, and the run is refused before it changes anything.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dino_dist.errors import CheckpointError, RunDirectoryBusy

LOG = logging.getLogger("dino_dist")
LOCK_NAME = "owner.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0  # 12 missed keep-alives: a live owner never gets near it
SETTLE_S = 0.2  # after a takeover, how long to wait before checking that no one else won it


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    pid_start: str  # /proc/<pid>/stat start time; "" where there is no /proc
    job: str        # "slurm:<id>", "torchrun:<run id>" or "" for a plain process
    restart: tuple[int, int]  # (SLURM restarts, torchrun restarts)
    started: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def describe(self) -> str:
        job = f", job {self.job.split(':', 1)[1]}" if self.job else ""
        return f"host {self.host}, pid {self.pid}{job}, started {self.started}"


def this_process() -> Owner:
    env = os.environ
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    job = (f"slurm:{env['SLURM_JOB_ID']}" if env.get("SLURM_JOB_ID")
           else f"torchrun:{run_id}" if run_id not in ("", "none") else "")
    restart = (int(env.get("SLURM_RESTART_COUNT") or 0),
               int(env.get("TORCHELASTIC_RESTART_COUNT") or 0))
    return Owner(socket.gethostname(), os.getpid(), pid_start_time(os.getpid()), job, restart,
                 time.strftime("%Y-%m-%d %H:%M:%S %Z"))


def pid_start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def pid_is_alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return not start or pid_start_time(pid) in ("", start)


def gone_reason(found: Owner, age_s: float, me: Owner) -> str | None:
    """Why the owner `found` (whose keep-alive is `age_s` old) is provably gone, or None."""
    if found.job and found.job == me.job and tuple(found.restart) < me.restart:
        return f"this job's earlier run (restart {list(found.restart)})"
    if found.host == me.host:
        return None if pid_is_alive(found.pid, found.pid_start) else "its process is dead"
    if age_s > STALE_AFTER_S:
        return f"its keep-alive is {age_s:.0f} s old (more than {STALE_AFTER_S:.0f} s)"
    return None


class RunLock:
    """The owner's side: take the directory, keep the lock alive, release it at the end."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.me = this_process()
        self.takeover: str | None = None  # what was taken over, for the run's log
        self._stop = threading.Event()

    def acquire(self) -> RunLock:
        """Own the directory, or raise RunDirectoryBusy naming the live owner."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._acquire()
        except OSError as err:
            raise CheckpointError(f"train.output_dir '{self.directory}' is not writable "
                                  f"({err.strerror or err}): choose a folder you can write to")
        threading.Thread(target=self._keep_alive, name="dino-dist-run-lock", daemon=True).start()
        return self

    def _acquire(self) -> None:
        while not self._create():
            found, age = read_lock(self.path)
            if found is None:  # removed meanwhile, or unreadable
                if self.path.exists() and age <= STALE_AFTER_S:
                    raise RunDirectoryBusy(self._busy_line("an unreadable lock", age))
                self.path.unlink(missing_ok=True)
                continue
            reason = gone_reason(found, age, self.me)
            if reason is None:
                raise RunDirectoryBusy(self._busy_line(f"a live run ({found.describe()})", age))
            if self._take_over(found):
                self.takeover = f"took over {self.path} from {found.describe()}: {reason}"
                return

    def _busy_line(self, owner: str, age: float) -> str:
        return (f"train.output_dir '{self.directory}' is in use by {owner}, last keep-alive "
                f"{age:.0f} s ago: wait for that run to end, or choose another "
                f"train.output_dir (a lock whose owner is gone is taken over by itself; "
                f"see {self.path})")

    def _create(self) -> bool:
        """The lock file appears whole or not at all: written aside, then hard-linked, which
        fails when the name exists (on NFS too)."""
        aside = self._write_aside()
        try:
            os.link(aside, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links (some FUSE mounts): create in place
            return self._create_exclusive()
        finally:
            aside.unlink(missing_ok=True)

    def _create_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        # Until the write below lands, a reader finds the file young and unreadable: busy.
        with os.fdopen(fd, "w") as lock_file:
            lock_file.write(json.dumps(asdict(self.me)))
        return True

    def _take_over(self, gone: Owner) -> bool:
        current, _ = read_lock(self.path)
        if current is None or current.token != gone.token:
            return False  # it changed since it was judged: judge again
        os.replace(self._write_aside(), self.path)
        time.sleep(SETTLE_S)  # two runs taking over at once: the last rename wins, both see it
        current, _ = read_lock(self.path)
        return current is not None and current.token == self.me.token

    def _write_aside(self) -> Path:
        aside = self.directory / f".{LOCK_NAME}.{self.me.token}.tmp"
        aside.write_text(json.dumps(asdict(self.me)))
        return aside

    def owned(self) -> bool:
        found, _ = read_lock(self.path)
        return found is not None and found.token == self.me.token

    def _keep_alive(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self.owned():
                # Another run judged this one gone (frozen past STALE_AFTER_S) and owns the
                # directory now: writing on would make two writers, so stop at once.
                LOG.error("the lock %s now belongs to another run: this run stops without "
                          "writing anything more", self.path)
                os._exit(1)
            try:
                os.utime(self.path)
            except OSError as err:  # a passing file-system error: the next beat tries again
                LOG.warning("cannot refresh %s (%s)", self.path, err.strerror or err)

    def release(self) -> None:
        self._stop.set()
        if self.owned():
            self.path.unlink(missing_ok=True)


def read_lock(path: Path) -> tuple[Owner | None, float]:
    """The owner a lock file names (None if missing or unreadable) and its keep-alive's age."""
    age = 0.0
    try:
        age = time.time() - path.stat().st_mtime
        values = json.loads(path.read_text())
        values["restart"] = tuple(values["restart"])
        return Owner(**values), age
    except FileNotFoundError:
        return None, 0.0
    except (OSError, ValueError, TypeError, KeyError):
        return None, age
