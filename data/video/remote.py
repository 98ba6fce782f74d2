"""Shards on object storage: `http(s)://` URLs read with the standard library, other schemes (`s3://`, `gs://`, ...)
through fsspec where it and the scheme's package are installed (docs/data.md "Shards on object storage").

A shard's index is read with one GET, a sample's member with one Range request (`bytes=a-b`), whose answer must be
206 with the Content-Range asked for and exactly that many bytes. Every request has a timeout (`timeout_s`: the
longest wait for a connection or for the next bytes, and the most it may take for each MiB it asks for); 5xx and
429 answers, connection errors, timeouts and short reads are tried again (`retries` times, waiting `backoff_s`, then
twice that, ..., each wait drawn from 0.5x to 1.5x of it so that many ranks do not retry in step), a member's retry
asking only for the bytes not yet received. Then RemoteError, which the loader records as the sample's failure
(data/video/loader.py), never a stop of the run.

Credentials: a URL's userinfo (`user:password@`) and query string (a presigned URL's signature) never leave this
module's requests. A shard is named by its clean URL (scheme, host, path): `RemoteShard`, a `str` whose value is
that clean URL and which carries the full URLs of the tar and its index for the requests alone. So a sample's key,
its quarantine records, log lines, the catalog's files and a checkpoint's data state see the clean URL only, equal
across runs, ranks and fresh signatures. URLs with credentials come from a list file (`resolve_remote`), never from
the config itself, which a run saves with its checkpoints.
"""
from __future__ import annotations

import base64
import functools
import json
import random
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from typing import Callable

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
HTTP_SCHEMES = ("http", "https")
_RETRY_STATUS = {429, 500, 502, 503, 504}
_GONE_STATUS = {404, 410}
_REFUSED_STATUS = {401, 403}


@dataclass(frozen=True)
class RemoteOptions:
    """How shards on object storage are read (VideoDataConfig.remote_*)."""
    timeout_s: float = 60.0
    retries: int = 4
    backoff_s: float = 1.0

    @classmethod
    def of(cls, cfg) -> "RemoteOptions":
        return cls(timeout_s=float(cfg.remote_timeout_s), retries=int(cfg.remote_retries),
                   backoff_s=float(cfg.remote_backoff_s))


class RemoteError(OSError):
    """A request that failed for good (after the retries where it was worth retrying). Its message names the clean
    URL, the byte range and the HTTP status or error; `gone`: the object is not there (404, 410, not found);
    `refused`: the store refuses every read of it alike (401 / 403: an expired or wrong credential, or a server that
    answers a Range request with the whole object), no fault of one sample's."""

    def __init__(self, message: str, *, status: int | None = None, gone: bool = False, refused: bool = False) -> None:
        super().__init__(message)
        self.status, self.gone, self.refused = status, gone, refused


class _Retry(Exception):
    """A failure worth another try (5xx, connection error, timeout, short read)."""


class _SinkError(Exception):
    """The receiver of the bytes failed (a full spill disk): its own error, raised as it is, never retried."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _give(sink: Callable[[bytes], None], buf: bytes) -> None:
    try:
        sink(buf)
    except Exception as e:
        raise _SinkError(e) from None


def scheme(spec: str) -> str | None:
    m = _SCHEME.match(spec)
    return m.group(1).lower() if m else None


def is_url(spec) -> bool:
    return isinstance(spec, str) and scheme(spec) is not None


def clean_url(url: str) -> str:
    """`url` without its userinfo, and an http(s) URL without its query string and fragment: what names it in keys,
    records and logs. (Another scheme's `?` is a glob's or a name's character, as fsspec reads it.)"""
    u = urllib.parse.urlsplit(url)
    if u.scheme.lower() not in HTTP_SCHEMES:
        at = url.find("@", len(u.scheme) + 3, url.find("/", len(u.scheme) + 3) % (len(url) + 1))
        return url if at < 0 else url[:len(u.scheme) + 3] + url[at + 1:]
    host = u.hostname or ""
    if u.port is not None:
        host = f"{host}:{u.port}"
    return urllib.parse.urlunsplit((u.scheme.lower(), host, u.path, "", ""))


def has_credentials(url: str) -> bool:
    """Whether naming `url` would show a secret: its userinfo, or an http(s) URL's query string or fragment."""
    u = urllib.parse.urlsplit(url)
    return "@" in u.netloc or (u.scheme.lower() in HTTP_SCHEMES and bool(u.query or u.fragment))


class RemoteShard(str):
    """A shard on object storage: the str is its clean URL (what names it everywhere); `url` and `index_url` are the
    full URLs its requests use (with the credentials a list file gave)."""

    url: str
    index_url: str
    size: int | None      # the tar's bytes as its index records them (load_catalog), None where unknown

    def __new__(cls, url: str, index_url: str | None = None) -> "RemoteShard":
        self = super().__new__(cls, clean_url(url))
        self.url = url
        self.index_url = index_url or index_url_of(url)
        self.size = None
        return self


def index_url_of(url: str) -> str:
    """The index beside a tar URL: the path's `.tar` replaced by `.idx.json`, the query string kept (a token that
    grants a whole prefix grants both)."""
    if scheme(url) not in HTTP_SCHEMES:        # fsspec's URLs have no query string
        return (url[:-4] if url.endswith(".tar") else url) + ".idx.json"
    u = urllib.parse.urlsplit(url)
    path = (u.path[:-4] if u.path.endswith(".tar") else u.path) + ".idx.json"
    return urllib.parse.urlunsplit((u.scheme, u.netloc, path, u.query, u.fragment))


def full_url(shard: str) -> str:
    return getattr(shard, "url", shard)


def full_index_url(shard: str) -> str:
    return getattr(shard, "index_url", None) or index_url_of(shard)


# ---------------------------------------------------------------------------------------------
# names: brace lists, list files
# ---------------------------------------------------------------------------------------------

def split_spec(spec: str) -> list[str]:
    """The comma-separated parts of a shard spec, a comma inside braces (`{a,b}`) not splitting."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def expand_braces(s: str) -> list[str]:
    """Brace lists as webdataset names shards: `shard-{000000..000009}.tar` (a range, zero-padded to the width of
    its first bound when that starts with 0) and `{a,b}` (alternatives), nested or several in one string; a string
    without braces is itself. ValueError for an unclosed brace or a range that counts down."""
    i = s.find("{")
    if i < 0:
        if "}" in s:
            raise ValueError(f"{s!r}: '}}' without '{{'")
        return [s]
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"{s!r}: '{{' without '}}'")
    inner, head, tail = s[i + 1:j], s[:i], s[j + 1:]
    m = _RANGE.match(inner)
    if m:
        a, b = m.group(1), m.group(2)
        if int(b) < int(a):
            raise ValueError(f"{s!r}: the range {{{inner}}} counts down")
        width = len(a) if a.startswith("0") else 0
        items = [str(k).zfill(width) for k in range(int(a), int(b) + 1)]
    elif "," in inner:
        items = [x for item in split_spec(inner) for x in expand_braces(item)]
    else:                           # `{x}` is no list: kept as it is
        items = ["{" + inner + "}"]
    return [head + x + t for x in items for t in expand_braces(tail)]


def is_list_file(part: str) -> bool:
    path = urllib.parse.urlsplit(part).path if is_url(part) else part
    return path.endswith(".txt")


def parse_list(text: str, where: str, base: str | None) -> list[tuple[str, str | None]]:
    """(tar, index or None) per line of a list file: `TAR [INDEX]`, a URL or a path (relative ones resolved against
    `base`, the list's own location); blank lines and lines starting with '#' skipped."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) > 2:
            raise ValueError(f"{where} line {n}: {len(fields)} fields; a line is a shard (URL or path) and, "
                             f"optionally, its index's URL")

        def absolute(x: str) -> str:
            if is_url(x) or base is None:
                return x
            return urllib.parse.urljoin(base, x) if is_url(base) else x
        out.append((absolute(fields[0]), absolute(fields[1]) if len(fields) == 2 else None))
    return out


# ---------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------

def _request(url: str, headers: dict) -> urllib.request.Request:
    """A request for `url` with its userinfo moved into a Basic Authorization header (urllib refuses it in the URL)."""
    u = urllib.parse.urlsplit(url)
    if u.username is not None or u.password is not None:
        user = urllib.parse.unquote(u.username or "")
        pw = urllib.parse.unquote(u.password or "")
        headers = dict(headers, Authorization="Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode())
        host = u.hostname or ""
        if u.port is not None:
            host = f"{host}:{u.port}"
        url = urllib.parse.urlunsplit((u.scheme, host, u.path, u.query, ""))
    return urllib.request.Request(url, headers=headers)


class _Redirect(urllib.request.HTTPRedirectHandler):
    """Follows redirects (the Range header with them), but drops the Authorization header (a URL's userinfo) where
    one leads to another host, as urllib's own handler does not."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _host(newurl) != _host(req.full_url):
            new.remove_header("Authorization")
        return new


def _host(url: str) -> tuple:
    u = urllib.parse.urlsplit(url)
    return u.scheme.lower(), (u.hostname or "").lower(), u.port


@functools.lru_cache(maxsize=1)
def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_Redirect)


def _open(url: str, headers: dict, opts: RemoteOptions):
    return _opener().open(_request(url, headers), timeout=opts.timeout_s)


def _with_retries(what: str, opts: RemoteOptions, attempt: Callable[[], object]):
    """attempt() until it returns, raises RemoteError (final), or has raised _Retry opts.retries + 1 times."""
    last = ""
    for k in range(opts.retries + 1):
        try:
            return attempt()
        except _Retry as e:
            last = str(e)
        if k < opts.retries:
            time.sleep(opts.backoff_s * (2 ** k) * random.uniform(0.5, 1.5))
    raise RemoteError(f"{what}: {last} ({opts.retries + 1} tries)")


def _classify(e: BaseException, what: str) -> Exception:
    """The exception of a failed request as _Retry or a final RemoteError, naming `what` (the clean URL and range)."""
    if isinstance(e, urllib.error.HTTPError):
        reason = f"HTTP {e.code} {e.reason}"
        if e.code in _RETRY_STATUS:
            return _Retry(reason)
        return RemoteError(f"{what}: {reason}", status=e.code, gone=e.code in _GONE_STATUS,
                           refused=e.code in _REFUSED_STATUS)
    if isinstance(e, (socket.timeout, TimeoutError)):
        return _Retry("timed out")
    if isinstance(e, urllib.error.URLError):
        r = e.reason
        if isinstance(r, (socket.timeout, TimeoutError)):
            return _Retry("timed out")
        return _Retry(f"connection failed ({type(r).__name__}: {r})" if isinstance(r, BaseException)
                      else f"connection failed ({r})")
    text = _scrub(str(e))[:200]
    if isinstance(e, (ConnectionError, HTTPException, OSError)):
        return _Retry(f"{type(e).__name__}: {text}")
    return RemoteError(f"{what}: {type(e).__name__}: {text}")


def _scrub(text: str) -> str:
    """`text` with every URL in it clean (an error of urllib or http.client may quote the URL it was given)."""
    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+", lambda m: clean_url(m.group(0)), text)


def http_get(url: str, opts: RemoteOptions) -> bytes:
    """The whole body of `url` (a shard's index, a list file), retried as the module says."""
    what = clean_url(url)

    def attempt() -> bytes:
        try:
            t0 = time.monotonic()
            with _open(url, {}, opts) as r:
                want = r.headers.get("Content-Length")
                n = int(want) if want is not None and want.isdigit() else None
                parts: list[bytes] = []
                got = _read_body(r, n, t0, opts, parts.append)
                if n is not None and got != n:
                    raise _Retry(f"short read ({got} of {want} bytes)")
                return b"".join(parts)
        except (_Retry, RemoteError):
            raise
        except Exception as e:
            raise _classify(e, what) from None
    return _with_retries(what, opts, attempt)


_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_MIB = 1 << 20


def _read_body(r, n: int | None, t0: float, opts: RemoteOptions, sink: Callable[[bytes], None],
               chunk: int = _MIB) -> int:
    """Up to `n` bytes (all, for None) of the response `r` of a request sent at `t0`, given to `sink` as they come
    (read1: whatever arrived); the count given. _Retry once the request has taken remote_timeout_s for each MiB it
    asks for (at least one): a floor of 1 MiB per timeout (17 KB/s at 60 s) that only a server trickling its bytes,
    each within the timeout of the last, stays under (it would hold the worker for hours)."""
    deadline = t0 + opts.timeout_s * max(1, -(-(n or 0) // _MIB))
    got = 0
    while n is None or got < n:
        buf = r.read1(chunk if n is None else min(chunk, n - got))
        if not buf:
            break
        sink(buf)
        got += len(buf)
        now = time.monotonic()
        if now > deadline and (n is None or got < n):
            raise _Retry(f"too slow ({got} bytes in {now - t0:.1f} s; remote_timeout_s = {opts.timeout_s:g} s a MiB)")
    return got


def http_read_range(url: str, offset: int, size: int, opts: RemoteOptions, sink: Callable[[bytes], None],
                    chunk: int = 1 << 20, total: int | None = None) -> None:
    """Bytes [offset, offset + size) of `url`, given to `sink` in order; a retry asks for the bytes not yet given.
    total: the object's size as its shard index says; a Content-Range of another total is a shard rewritten since
    (RemoteError: its members are no longer where the index says)."""
    if size <= 0:
        return
    done = [0]
    what = f"{clean_url(url)} bytes={offset}-{offset + size - 1}"

    def attempt() -> None:
        a, b = offset + done[0], offset + size - 1
        t0 = time.monotonic()
        try:
            with _open(url, {"Range": f"bytes={a}-{b}"}, opts) as r:
                if r.status != 206:
                    raise RemoteError(f"{what}: HTTP {r.status} to a Range request (the server must answer 206 "
                                      f"Partial Content)", status=r.status, refused=True)
                cr = _CONTENT_RANGE.match(r.headers.get("Content-Range", "").strip())
                if not cr or (int(cr.group(1)), int(cr.group(2))) != (a, b):
                    raise RemoteError(f"{what}: Content-Range {r.headers.get('Content-Range')!r} for bytes={a}-{b}",
                                      status=r.status)
                if total is not None and cr.group(3) != "*" and int(cr.group(3)) != total:
                    raise RemoteError(f"{what}: the object has {cr.group(3)} bytes, its shard index says {total}: "
                                      f"the shard was rewritten after its index was read (objects are taken as "
                                      f"immutable: a new shard name, or a fresh data.video.index_dir)",
                                      status=r.status)
                def give(buf: bytes) -> None:
                    _give(sink, buf)
                    done[0] += len(buf)
                _read_body(r, size - done[0], t0, opts, give, chunk)
                if done[0] < size:
                    raise _Retry(f"short read ({done[0]} of {size} bytes)")
        except (_Retry, RemoteError, _SinkError):
            raise
        except Exception as e:
            raise _classify(e, what) from None
    _receive(what, opts, attempt)


def _receive(what: str, opts: RemoteOptions, attempt: Callable[[], None]) -> None:
    try:
        _with_retries(what, opts, attempt)
    except _SinkError as e:
        raise e.error from None


# ---------------------------------------------------------------------------------------------
# fsspec (s3://, gs://, ...)
# ---------------------------------------------------------------------------------------------

def fsspec_fs(url: str, field: str = "shards"):
    """(filesystem, path) of a non-HTTP URL through fsspec; ValueError naming the package to install."""
    sch = scheme(url)
    try:
        import fsspec
    except ImportError:
        raise ValueError(f"VideoDataConfig.{field}: {clean_url(url)!r} needs fsspec for {sch}:// URLs (pip install "
                         f"fsspec and the package of the scheme, e.g. s3fs, gcsfs); http(s):// URLs need nothing "
                         f"else") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise ValueError(f"VideoDataConfig.{field}: {clean_url(url)!r}: fsspec cannot open {sch}:// URLs here "
                         f"({str(e)[:300]})") from None


def _fs_attempt(what: str, fn):
    try:
        return fn()
    except (_Retry, _SinkError):
        raise
    except FileNotFoundError:
        raise RemoteError(f"{what}: not found", gone=True) from None
    except PermissionError as e:
        raise RemoteError(f"{what}: permission denied ({str(e)[:200]})", refused=True) from None
    except (ConnectionError, TimeoutError, OSError) as e:
        raise _Retry(f"{type(e).__name__}: {str(e)[:200]}") from None


def fs_get(url: str, opts: RemoteOptions) -> bytes:
    fs, path = fsspec_fs(url)
    what = clean_url(url)
    return _with_retries(what, opts, lambda: _fs_attempt(what, lambda: fs.cat_file(path)))


def fs_read_range(url: str, offset: int, size: int, opts: RemoteOptions, sink: Callable[[bytes], None],
                  chunk: int = 8 << 20) -> None:
    if size <= 0:
        return
    fs, path = fsspec_fs(url)
    what = f"{clean_url(url)} bytes={offset}-{offset + size - 1}"
    done = [0]

    def attempt() -> None:
        while done[0] < size:
            n = min(chunk, size - done[0])
            buf = fs.cat_file(path, start=offset + done[0], end=offset + done[0] + n)
            if len(buf) != n:
                raise _Retry(f"short read ({done[0] + len(buf)} of {size} bytes)")
            _give(sink, buf)
            done[0] += n
    _receive(what, opts, lambda: _fs_attempt(what, attempt))


def fs_glob(url: str) -> list[str]:
    """The .tar objects a non-HTTP URL names: a folder (ending in '/'), a glob or one object."""
    fs, path = fsspec_fs(url)
    if any(c in path for c in "*?["):
        hits = fs.glob(path)
    elif url.endswith("/") or fs.isdir(path):
        hits = fs.ls(path, detail=False)
    else:
        return [url] if path.endswith(".tar") else []
    return [fs.unstrip_protocol(h) for h in hits if h.endswith(".tar")]


# ---------------------------------------------------------------------------------------------
# what the loader calls
# ---------------------------------------------------------------------------------------------

def get(url: str, opts: RemoteOptions) -> bytes:
    return http_get(url, opts) if scheme(url) in HTTP_SCHEMES else fs_get(url, opts)


def read_range(url: str, offset: int, size: int, opts: RemoteOptions, sink: Callable[[bytes], None],
               total: int | None = None) -> None:
    if scheme(url) in HTTP_SCHEMES:
        http_read_range(url, offset, size, opts, sink, total=total)
    else:
        fs_read_range(url, offset, size, opts, sink)


def load_index(shard: str, opts: RemoteOptions) -> dict:
    """The shard index (`<shard>.idx.json`) of a shard on object storage. ValueError naming its clean URL when it is
    not there (a shard on object storage is not scanned: that would read the whole tar) or not an index."""
    url = full_index_url(shard)
    try:
        data = get(url, opts)
    except RemoteError as e:
        why = ("not found: upload the .idx.json that launch/ingest.py writes beside each tar"
               if e.gone else str(e))
        raise ValueError(f"shard index {clean_url(url)} of {shard}: {why}") from None
    try:
        idx = json.loads(data)
    except ValueError as e:
        raise ValueError(f"shard index {clean_url(url)} of {shard}: not JSON ({e})") from None
    if not isinstance(idx, dict) or not isinstance(idx.get("samples"), list):
        raise ValueError(f"shard index {clean_url(url)} of {shard}: not a shard index (no 'samples' list)")
    return idx
