"""Arrays that the processes of a node build once and all memory-map: the token files' epoch orders
(data/token_files.TokenSource), the packed loader's catalog and epoch plans (data/video/shards.Catalog, loader.Planner).

`shared_arrays(directory, stem, parts, build, check)` returns the arrays `<directory>/<stem>.<part>.npy`:
- mapped read-only where they exist and `check` accepts them (a process of the node, or an earlier run, wrote them);
- else built by the first process that needs them, under an `fcntl` lock on `<stem>.lock` (the others wait on the
  lock, then map what it wrote). Each file is written beside its name and renamed, so a name that exists is whole; a
  torn, short or foreign file fails `np.load` or `check` and is built again. The holder writes its host, pid and a
  count it raises every LOCK_BEAT_S into the lock file; a waiter that sees no change in it for LOCK_STALE_S stops
  waiting (LockStale, naming the file and the holder) and builds in memory, as below: on NFSv3 a lock can outlive a
  node that died holding it, and every other process waited for it forever;
- where the directory cannot be made, written or locked (a filesystem without `flock`), built in this process's memory;
  the returned note says why (the caller logs it once). Files another process prunes between their writing and
  their reading back are used as built, from memory, without a note. Files are removed by `prune`, which the caller
  calls only for epochs no process of the run reads any more (on NFS a file removed under another node's map is
  ESTALE there).

`shared_chunks(...)` does the same for arrays made of chunks that can be built apart (the packed loader's document
sizes: tokenizing every text): the node's processes build the chunks side by side, each taking the chunks no other
process has locked, then waiting for the rest; the first with all of them merges them.

A directory's name must say what its arrays are a function of (the caller's key): nothing here checks that the files
belong to the data they are opened for beyond their shapes and dtypes.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np


LOCK_BEAT_S = 10.0    # how often a lock's holder writes that it lives (its count in the lock file)
LOCK_STALE_S = 120.0  # a holder whose count has not moved for this long is taken for dead (LockStale)


class LockStale(TimeoutError):
    """A lock whose holder has not written that it lives for LOCK_STALE_S (an OSError: built in memory instead)."""


def host_name() -> str:
    """This machine's name as it goes into file names and lock records (characters other than [A-Za-z0-9_.-] as _)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())


def _holder(path: Path) -> str:
    """What the lock file says of its holder, read afresh (an open revalidates the file on NFS: close-to-open)."""
    try:
        with open(path) as f:
            return f.read(200).strip()
    except OSError:
        return ""


def _acquire(lock, path: Path, *, wait: bool) -> bool:
    """Takes the flock on `lock` (the open file `path`): False where another process holds it and wait is False;
    LockStale where its holder has not written that it lives for LOCK_STALE_S."""
    import fcntl
    delay, seen, since, looked = 0.01, None, time.monotonic(), 0.0
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not wait:
                return False
        now = time.monotonic()
        if now - looked >= min(LOCK_BEAT_S, LOCK_STALE_S / 4):
            looked, holder = now, _holder(path)
            if holder != seen:
                seen, since = holder, now
            elif now - since >= LOCK_STALE_S:
                raise LockStale(f"{path} is held by {holder or 'a process that wrote nothing in it'}, which has not "
                                f"written that it lives for {now - since:.0f} s (LOCK_STALE_S {LOCK_STALE_S:g}): its "
                                f"process or node died holding it (an NFSv3 lock can outlive its node). Remove {path} "
                                f"to let the next run build there")
        time.sleep(delay)
        delay = min(2 * delay, 1.0)


class _Beat:
    """While held: the lock file says who holds it (host, pid) and a count raised every LOCK_BEAT_S (_acquire)."""

    def __init__(self, lock):
        self.fd, self.done = lock.fileno(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="node-files-lock")

    def _write(self, count: int) -> None:
        try:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"host {host_name()} pid {os.getpid()} beat {count}\n".encode())
            os.fsync(self.fd)      # to the server, where waiters on other nodes read it
        except OSError:
            pass

    def _run(self) -> None:
        count = 1
        while not self.done.wait(LOCK_BEAT_S):
            self._write(count)
            count += 1

    def __enter__(self):
        self._write(0)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def _open(names: list[Path], check: Callable[[tuple], bool]):
    try:
        # plain arrays over the maps: np.memmap's indexing runs Python code on every access
        got = tuple(np.load(n, mmap_mode="r").view(np.ndarray) for n in names)
    except (OSError, ValueError, EOFError):   # missing, or a torn or foreign file: built again
        return None
    try:
        return got if check(got) else None
    except (ValueError, IndexError, TypeError):
        return None


def _write(names: list[Path], arrays) -> None:
    # the host in the name too: on a filesystem shared by several nodes whose flock does not lock across them (Lustre
    # mounted with localflock), processes of two nodes may build the same file at once, and containers give their
    # processes the same pids; one file for both let the second truncate the first's under it
    host = host_name()
    for name, a in zip(names, arrays):
        tmp = name.with_name(f"{name.name}.{host}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(a))
        os.replace(tmp, name)


def _locked(directory: Path, stem: str, parts: Sequence[str], build: Callable[[], tuple],
            check: Callable[[tuple], bool], *, wait: bool = True):
    """The arrays of `stem`: mapped, or built under its lock and mapped. With wait=False, None where another process
    holds the lock (it is building them). OSError where the directory cannot be written or locked."""
    names = [directory / f"{stem}.{part}.npy" for part in parts]
    got = _open(names, check)
    if got is not None:
        return got
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.lock"
    with open(path, "a+") as lock:
        if not _acquire(lock, path, wait=wait):   # released when the file closes, or the process dies
            return None
        got = _open(names, check)
        if got is None:
            with _Beat(lock):
                built = tuple(build())
                _write(names, built)
            got = _open(names, check)
            if got is None:
                if not all(n.exists() for n in names):
                    # removed since it was written: the run's ranks are past it and one of them pruned it (`prune`;
                    # a process that comes to an old epoch, e.g. a held-out set on the training data). What was
                    # built is whole: used from memory, as a process would rebuild it
                    return built
                raise OSError(f"{names[0]}: written, but does not read back whole")
    return got


def shared_arrays(directory: Path | None, stem: str, parts: Sequence[str], build: Callable[[], tuple],
                  check: Callable[[tuple], bool], *, strict: bool = False) -> tuple[tuple, str]:
    """(arrays, note): `parts`' arrays of `stem`, mapped from `directory` or built (module docstring). `build()` returns
    them in `parts`' order; `check(arrays)` says whether arrays read back are what the caller expects (shapes,
    dtypes). With `directory` None they are built in memory and the note is empty. strict: where the directory cannot
    be made, written or locked, the OSError is raised (the caller tries another place) instead of building here."""
    if directory is None:
        return tuple(build()), ""
    try:
        return _locked(Path(directory), stem, parts, build, check), ""
    except OSError as err:
        if strict:
            raise
        return tuple(build()), f"{directory}: {err}"


def shared_chunks(directory: Path | None, stem: str, parts: Sequence[str], count: int,
                  build: Callable[[int], tuple], check: Callable[[int, tuple], bool],
                  merge: Callable[[list[tuple]], tuple], check_merged: Callable[[tuple], bool]) -> tuple[tuple, str]:
    """(arrays, note) as `shared_arrays`, for arrays made of `count` chunks that can be built apart (`build(i)`, then
    `merge` of all the chunks in order): the node's processes build the chunks side by side. Each takes, from a place
    of its own, every chunk no other process is building (a lock tried without waiting), then waits for the chunks
    the others build; the first with all of them merges them (`<stem>.part<i>.*` stay beside the merged files)."""
    if directory is None:
        return tuple(merge([build(i) for i in range(count)])), ""
    directory = Path(directory)
    try:
        got = _open([directory / f"{stem}.{part}.npy" for part in parts], check_merged)
        if got is not None:
            return got, ""
        chunks: dict[int, tuple] = {}
        first = os.getpid() % count
        order = [(first + k) % count for k in range(count)]
        for wait in (False, True):
            for i in order:
                if i not in chunks:
                    got = _locked(directory, f"{stem}.part{i}", parts, lambda: build(i),
                                  lambda a: check(i, a), wait=wait)
                    if got is not None:
                        chunks[i] = got
        return _locked(directory, stem, parts, lambda: merge([chunks[i] for i in range(count)]), check_merged), ""
    except OSError as err:
        return tuple(merge([build(i) for i in range(count)])), f"{directory}: {err}"


def shaped(arrays: tuple, specs: Sequence[tuple[int | None, type]]) -> bool:
    """Whether each array is one-dimensional with the spec's length (None: any) and dtype: what a `check` of
    `shared_arrays` usually asks of what it reads back."""
    return len(arrays) == len(specs) and all(
        a.ndim == 1 and (n is None or a.shape[0] == n) and a.dtype == np.dtype(t) for a, (n, t) in zip(arrays, specs))


def prune(directory: Path, prefix: str, keep_from: int) -> None:
    """Remove `<prefix><k>.*` files of `directory` with k < keep_from: the epochs that every process of the run is
    past, which only the caller can tell (its position less the most any rank may lag behind it). A process that maps
    one keeps its pages on a local disk; on NFS a file removed under another node's map is ESTALE there."""
    for f in Path(directory).glob(f"{prefix}*"):
        k = f.name[len(prefix):].split(".", 1)[0]
        if k.isdigit() and int(k) < keep_from:
            f.unlink(missing_ok=True)


def json_array(obj) -> np.ndarray:
    """A JSON-able object as a uint8 array (to keep beside arrays in `shared_arrays`)."""
    import json
    return np.frombuffer(json.dumps(obj, separators=(",", ":")).encode(), dtype=np.uint8)


def array_json(a: np.ndarray):
    """The object `json_array` stored."""
    import json
    return json.loads(np.asarray(a).tobytes())
