"""Where tar shards live: a local or NFS folder, or an S3-compatible prefix.

A store reads byte ranges of named files (one `pread` locally, one ranged GET remotely), lists
the shards with their sizes, and writes small files (the index). Network reads are retried with
backoff; a read that still fails becomes one DataError naming the shard, so the run stops with
its last checkpoint intact and resumes from it.

Loader processes are forked from the trainer: open files and the S3 client (an asyncio event
loop underneath) are not safe to inherit, so both are made lazily, per process id.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from dino_dist.atomic_file import write_atomically
from dino_dist.errors import DataError

S3_SCHEME = "s3://"
SHARD_SUFFIX = ".tar"
OPEN_SHARDS_PER_PROCESS = 64  # bounded so 100k shards never exhaust file descriptors
RETRY_S = 30.0  # backoff before a failing read is given up (data.read_retry_s)
# The S3 client retries a little itself (throttling answers need it); the backoff above is the
# policy, so the client's own is kept short, and a hung connection is given up in seconds.
CLIENT_RETRIES = 2
CLIENT_CONFIG = {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 10,
                 "read_timeout": 30}

T = TypeVar("T")


def is_remote(location: str) -> bool:
    return location.startswith(S3_SCHEME)


# Where the network stacks' own errors come from; anything else (a TypeError) is a bug and
# is raised at once instead of being retried.
NETWORK_MODULES = {"aiobotocore", "aiohttp", "botocore", "fsspec", "http", "s3fs", "urllib3"}


def is_transient(error: Exception) -> bool:
    return isinstance(error, (OSError, EOFError)) or type(error).__module__.split(".")[0] in NETWORK_MODULES


def backoff_delays(total_s: float) -> tuple[float, ...]:
    """Waits that double from 0.2 s (at most 8 s each) and add up to `total_s`."""
    delays, wait = [], 0.2
    while sum(delays) < total_s:
        delays.append(min(wait, 8.0, total_s - sum(delays)))
        wait *= 2
    return tuple(delays)


def with_retries(what: str, read: Callable[[], T], delays: tuple[float, ...]) -> T:
    """`read()`, retried after each delay when the storage fails; then one DataError naming `what`.

    A missing file or a refused permission is not transient: it fails at once.
    """
    for attempt in range(len(delays) + 1):
        try:
            return read()
        except DataError:
            raise  # already the one line a user gets
        except (FileNotFoundError, PermissionError) as error:
            raise DataError(f"{what}: {type(error).__name__}: {error}: check that the shard set "
                            "is complete and readable") from error
        except Exception as error:
            if not is_transient(error):
                raise
            if attempt == len(delays):
                tries = f"{attempt + 1} attempts" if attempt else "1 attempt"
                raise DataError(f"{what}: gave up after {tries}, the last with {type(error).__name__}: "
                                f"{error}: check the storage and the network, then restart the run "
                                "(it resumes from its last checkpoint)") from error
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


class LocalStore:
    """Shards in a local or network-mounted folder."""

    def __init__(self, folder: str | Path, retry_s: float = RETRY_S) -> None:
        self.folder = Path(folder).expanduser()
        self.location = str(self.folder)
        self.retry_s, self.delays = retry_s, backoff_delays(retry_s)
        self._files: OrderedDict[str, int] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "retry_s": self.retry_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"], state["retry_s"])

    def list_shards(self) -> dict[str, int]:
        """{name: size in bytes} of the .tar files in the folder."""
        if not self.folder.is_dir():
            raise DataError(f"shard folder '{self.folder}' does not exist: set data.path to a folder "
                            "of .tar shards, a brace pattern of them, or an s3:// prefix")
        return {entry.name: entry.stat().st_size for entry in os.scandir(self.folder)
                if entry.name.endswith(SHARD_SUFFIX) and not entry.name.startswith(".")}

    def read(self, name: str, offset: int, size: int) -> bytes:
        # NFS can fail a read for a moment (a server failing over): retried like S3.
        data = with_retries(f"reading shard '{self.folder / name}'",
                            lambda: os.pread(self._open(name), size, offset), self.delays)
        if len(data) != size:
            raise DataError(f"shard '{self.folder / name}' ends before byte {offset + size}: it changed "
                            "after it was indexed; re-run dino-shard --index on the folder")
        return data

    def read_file(self, name: str) -> bytes:
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError as error:
            raise DataError(f"'{self.folder / name}' is missing: {error}") from error

    def exists(self, name: str) -> bool:
        return (self.folder / name).exists()

    def write_file(self, name: str, data: bytes) -> None:
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: f.write(data))

    def local_path(self, name: str) -> Path:
        return self.folder / name

    def _open(self, name: str) -> int:
        if self._pid != os.getpid():  # forked: the parent's descriptors are not ours to close
            self._files, self._pid = OrderedDict(), os.getpid()
        fd = self._files.pop(name, None)
        if fd is None:
            try:
                fd = os.open(self.folder / name, os.O_RDONLY)
            except FileNotFoundError as error:
                raise DataError(f"shard '{self.folder / name}' is missing: restore it, or re-run "
                                "dino-shard --index on what is there") from error
            if len(self._files) >= OPEN_SHARDS_PER_PROCESS:
                os.close(self._files.popitem(last=False)[1])
        self._files[name] = fd
        return fd


class S3Store:
    """Shards under s3://bucket/prefix on any S3-compatible endpoint.

    The endpoint and keys come from the standard environment (AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), as every S3 tool reads them.
    """

    def __init__(self, url: str, retry_s: float = RETRY_S) -> None:
        self.url = url.rstrip("/")
        self.retry_s, self.delays = retry_s, backoff_delays(retry_s)
        self.location = self.url
        self._prefix = self.url[len(S3_SCHEME):]
        self._fs = None
        self._pid = -1

    def __getstate__(self) -> dict:
        return {"url": self.url, "retry_s": self.retry_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state["retry_s"])

    def list_shards(self) -> dict[str, int]:
        def listing() -> dict[str, int]:
            found = self.fs.ls(self._prefix, detail=True, refresh=True)
            return {entry["name"].rsplit("/", 1)[-1]: int(entry["size"]) for entry in found
                    if entry.get("type") == "file" and entry["name"].endswith(SHARD_SUFFIX)}
        return with_retries(f"listing '{self.url}'", listing, self.delays)

    def read(self, name: str, offset: int, size: int) -> bytes:
        path = f"{self._prefix}/{name}"
        data = with_retries(f"reading shard '{self.url}/{name}'",
                            lambda: self.fs.cat_file(path, start=offset, end=offset + size), self.delays)
        if len(data) != size:
            raise DataError(f"shard '{self.url}/{name}' ends before byte {offset + size}: it changed "
                            "after it was indexed; re-run dino-shard --index on the prefix")
        return data

    def read_file(self, name: str) -> bytes:
        return with_retries(f"reading '{self.url}/{name}'", lambda: self.fs.cat_file(f"{self._prefix}/{name}"),
                            self.delays)

    def exists(self, name: str) -> bool:
        return with_retries(f"looking for '{self.url}/{name}'", lambda: self.fs.exists(f"{self._prefix}/{name}"),
                            self.delays)

    def write_file(self, name: str, data: bytes) -> None:
        # One PUT: an S3 object is whole or absent, as a renamed local file is.
        with_retries(f"writing '{self.url}/{name}'", lambda: self.fs.pipe_file(f"{self._prefix}/{name}", data),
                     self.delays)

    def local_path(self, name: str) -> None:
        return None

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            try:
                import s3fs
            except ImportError as error:
                raise DataError("reading s3:// shards needs s3fs: pip install 'dino_dist[s3]' "
                                "(or pip install s3fs)") from error
            # skip_instance_cache: fsspec's cache would hand a forked process its parent's client.
            self._fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False,
                                         config_kwargs=CLIENT_CONFIG)
            self._fs.retries = CLIENT_RETRIES  # a class setting of s3fs, not an argument
            self._pid = os.getpid()
        return self._fs


def open_store(location: str, retry_s: float = RETRY_S) -> LocalStore | S3Store:
    return S3Store(location, retry_s) if is_remote(location) else LocalStore(location, retry_s)
