"""A guarded child process that runs decode/probe jobs, so a segfault or a hang costs one sample.

`GuardedWorker` starts `python -m data.video.isolation` with pipes (subprocess, so it also works
from a daemonic DataLoader worker, which multiprocessing would refuse), sends length-prefixed
pickled requests, and waits for each answer with a deadline. If the child dies (SIGSEGV, abort,
OOM kill) the call raises `WorkerFailure("crashed", ...)`, if it misses the deadline the child is
killed and the call raises `WorkerFailure("timeout", ...)`; either way the next call starts a fresh
child. Exceptions inside a job come back as `WorkerFailure(reason, detail)` with the job's own
reason (e.g. "decode_error"). Decoded frames travel through a file in tmpfs, not the pipe.

The child keeps its protocol on a private dup of stdout and points fd 1 at stderr, so library
chatter on stdout cannot corrupt the stream; stderr goes to a small per-child log whose tail is
attached to crash reports.
"""
from __future__ import annotations

import importlib
import math
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HEADER = struct.Struct("<Q")
_POLL_MAX_MS = 2 ** 31 - 1   # the most one poll() takes (a C int of milliseconds, ~24.8 days); longer waits poll again
_PARENT_ENV = "KEYE_GUARD_PARENT_PID"   # the process that starts a child, for its _die_with_parent
START_TIMEOUT_S = 120.0
"""How long a fresh child may take to start (python, numpy, the decoders' imports) before its first job's own deadline
begins: a job's timeout_s is the job's alone."""
_REPO_ROOT = str(Path(__file__).resolve().parents[2])


class WorkerFailure(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _write_msg(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    buf = memoryview(_HEADER.pack(len(data)) + data)
    while buf:
        n = os.write(fd, buf)
        buf = buf[n:]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            # poll, not select: select() refuses a descriptor numbered 1024 or more, which a process that holds
            # many files, sockets or process groups gets
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                if poller.poll(min(_POLL_MAX_MS, max(1, math.ceil(left * 1000)))):
                    break
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None          # EOF: the other side is gone
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_msg(fd: int, deadline: float | None = None):
    head = _read_exact(fd, _HEADER.size, deadline)
    if head is None:
        return None
    (size,) = _HEADER.unpack(head)
    body = _read_exact(fd, size, deadline)
    if body is None:
        return None
    return pickle.loads(body)


class GuardedWorker:
    """Parent side. Not thread-safe: one caller at a time (one per DataLoader worker/thread)."""

    def __init__(self, *, name: str = "video", log_dir: str | None = None) -> None:
        self.name = name
        self.log_dir = log_dir or tempfile.gettempdir()
        self.proc: subprocess.Popen | None = None
        self.num_starts = 0
        self.num_failures = 0
        self._log = None

    # -- lifecycle ----------------------------------------------------------------------------
    def _start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = _REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env[_PARENT_ENV] = str(os.getpid())
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env.setdefault(var, "1")
        if self._log is None:
            # an anonymous log: unlinked at once, so nothing is left behind even if we are killed
            fd, path = tempfile.mkstemp(prefix=f"keye-{self.name}-", suffix=".log", dir=self.log_dir)
            os.close(fd)
            self._log = open(path, "a+b")
            os.unlink(path)
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "data.video.isolation"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            env=env, cwd=_REPO_ROOT, close_fds=True)
        self.num_starts += 1

    def close(self) -> None:
        p, self.proc = self.proc, None
        if p is not None:
            try:
                p.stdin.close()
            except Exception:
                pass
            try:
                p.wait(timeout=2)
            except Exception:
                p.kill()
                p.wait()
            try:
                p.stdout.close()
            except Exception:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _kill(self) -> None:
        p, self.proc = self.proc, None
        if p is not None:
            try:
                p.kill()
            except Exception:
                pass
            p.wait()
            for f in (p.stdin, p.stdout):
                try:
                    f.close()
                except Exception:
                    pass

    def _log_tail(self, n: int = 600) -> str:
        try:
            fd = self._log.fileno()
            size = os.fstat(fd).st_size
            return os.pread(fd, n, max(0, size - n)).decode("utf-8", "replace").strip().replace("\n", " | ")
        except Exception:
            return ""

    # -- calls --------------------------------------------------------------------------------
    def call(self, op: str, timeout_s: float | None = None, **kwargs):
        """Run `op(**kwargs)` in the child; returns its result or raises WorkerFailure."""
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self._kill()
            self._start()
            # the child's start (about 0.5 s here, seconds on a loaded node) is not the job's: charged to its
            # deadline, the file after a timeout or crash failed too whenever timeout_s was short, and the next,
            # each in a fresh child (ingest rejected every later file of a worker as `timeout`)
            self._call("_ready", START_TIMEOUT_S, {}, what="the child's start")
        return self._call(op, timeout_s, kwargs)

    def _call(self, op: str, timeout_s: float | None, kwargs: dict, what: str = ""):
        what = what or op
        if self._log is not None:
            self._log.truncate(0)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            _write_msg(self.proc.stdin.fileno(), (op, kwargs))
            reply = _read_msg(self.proc.stdout.fileno(), deadline)
        except TimeoutError:
            self._kill()
            self.num_failures += 1
            raise WorkerFailure("timeout", f"{what} took longer than {timeout_s:g} s; child killed") from None
        except (BrokenPipeError, OSError):
            reply = None
        if reply is None:
            code = self.proc.wait() if self.proc is not None else None
            self._kill()
            self.num_failures += 1
            sig = ""
            if code is not None and code < 0:
                try:
                    sig = signal.Signals(-code).name
                except ValueError:
                    sig = f"signal {-code}"
            raise WorkerFailure("crashed", f"{what}: child exited ({sig or code}); log: {self._log_tail()}")
        status, payload = reply
        if status == "ok":
            return payload
        reason, detail = payload
        raise WorkerFailure(reason, detail)


# ---------------------------------------------------------------------------------------------
# child side
# ---------------------------------------------------------------------------------------------

def _op_inspect(path: str, proxy: dict | None = None, proxy_path: str | None = None,
                threads: int = 1, check_decord: bool = True, scenes: dict | None = None,
                convert_path: str | None = None) -> dict:
    from .probe import ProxySpec, SceneSpec, inspect_video

    spec = ProxySpec(**proxy) if proxy else None
    return inspect_video(path, proxy=spec, proxy_path=proxy_path, threads=threads, check_decord=check_decord,
                         scenes=SceneSpec(**scenes) if scenes else None, convert_path=convert_path)


def _op_inspect_image(path: str) -> dict:
    from .images import inspect_image

    return inspect_image(path)


def _op_decode_image(shard: str, offset: int, size: int, height: int, width: int, out_path: str,
                     what: str = "image") -> tuple[int, int, int, int]:
    """An image member of a shard -> its planned pixels, written raw to `out_path` (images.decode_member)."""
    from .images import decode_member

    _fault_injection(what)
    arr = decode_member(shard, offset, size, height, width, what=what)
    with open(out_path, "wb") as f:
        f.write(memoryview(arr).cast("B"))
    return tuple(arr.shape)


def _fault_injection(path: str) -> None:
    """Test hook: KEYE_DECODE_FAULT="crash:<substring>" or "hang:<substring>" makes the decode of a
    file whose original name contains <substring> segfault or hang, like a broken decoder would."""
    spec = os.environ.get("KEYE_DECODE_FAULT", "")
    if not spec or ":" not in spec:
        return
    kind, _, needle = spec.partition(":")
    if needle and needle in os.path.basename(path):
        if kind == "crash":
            _op_crash()
        elif kind == "hang":
            _op_hang()


def _op_decode(backend: str, out_path: str, fault_tag: str = "", **req) -> tuple[int, int, int, int]:
    from .backends import DecodeRequest, decode_frames

    _fault_injection(fault_tag or req["path"])
    arr = decode_frames(backend, DecodeRequest(**req))
    with open(out_path, "wb") as f:
        f.write(memoryview(arr).cast("B"))
    return tuple(arr.shape)


def _op_ready() -> int:
    """The first call of a fresh child, before its first job: the decoders' imports made (the first job's deadline
    is that job's), its pid back."""
    for mod in ("av", "PIL.Image"):
        try:
            importlib.import_module(mod)
        except ImportError:          # a backend not installed: its jobs say so
            pass
    return os.getpid()


def _op_crash() -> None:          # for tests: what a decoder segfault looks like
    os.kill(os.getpid(), signal.SIGSEGV)


def _op_hang(seconds: float = 3600.0) -> None:   # for tests: a stuck decoder
    time.sleep(seconds)


_OPS = {"inspect": _op_inspect, "inspect_image": _op_inspect_image, "decode": _op_decode,
        "decode_image": _op_decode_image, "ping": lambda: os.getpid(), "_ready": _op_ready,
        "_crash": _op_crash, "_hang": _op_hang}


def _die_with_parent() -> None:
    """Ends this child with the thread that started it (Linux's PR_SET_PDEATHSIG; elsewhere nothing is done): a
    DataLoader worker killed outright (SIGKILL, the OOM killer), or a rank with it, while its child decoded a file
    that hangs left the child running, orphaned, until that decode ended (never, for a decoder stuck in a loop).
    The thread that starts a child is the one that calls it: a loader worker's main thread, or an ingest thread
    (thread-local children, ended with their threads)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:     # 1 = PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    parent = os.environ.get(_PARENT_ENV, "")
    if parent.isdigit() and os.getppid() != int(parent):   # the parent died before the signal was asked for
        os._exit(1)


def _child_main() -> None:
    _die_with_parent()
    proto_out = os.dup(1)
    os.dup2(2, 1)                      # stray prints go to the log, not the protocol
    proto_in = sys.stdin.fileno()
    from .backends import DecodeError
    from .images import ImageError
    from .probe import ProbeError

    while True:
        msg = _read_msg(proto_in)
        if msg is None:
            return
        op, kwargs = msg
        try:
            result = ("ok", _OPS[op](**kwargs))
        except (DecodeError, ProbeError, ImageError) as e:
            result = ("err", (e.reason, e.detail))
        except MemoryError as e:       # the job needed more memory than this child could have: not the file's fault
            result = ("err", ("out_of_memory", f"{op}: MemoryError {str(e)[:200]}".strip()))
        except Exception as e:         # anything else: report it, keep serving
            result = ("err", ("exception", f"{type(e).__name__}: {str(e)[:500]}"))
        _write_msg(proto_out, result)


if __name__ == "__main__":
    _child_main()
