"""Shards on object storage: `http(s)://` URLs read with the standard library, other schemes (`s3://`, `gs://`, ...)
through fsspec where it and the scheme's package are installed (docs/data.md "Shards on object storage").

A shard's index is read with one GET, a sample's member with one Range request (`bytes=a-b`), whose answer must be
206 with the Content-Range asked for and exactly that many bytes. Requests go over kept (keep-alive) connections, a
pool per process and host (`_Pool`), so that a worker's thousands of small reads do not each pay a TCP and TLS
handshake; proxies come from http_proxy / https_proxy / no_proxy. Every request has a timeout (`timeout_s`: the
longest wait for a connection, the name's lookup included, or for the next bytes, and the most the whole request may
take for each MiB it asks for); 5xx and 429 answers, connection errors, timeouts and short reads are tried again
(`retries` times, waiting `backoff_s`, then twice that, ..., each wait drawn from 0.5x to 1.5x of it so that many
ranks do not retry in step; longer where the answer's Retry-After asks more, up to `timeout_s`), a member's retry
asking only for the bytes not yet received. Then RemoteError, which the loader records as the sample's failure
(data/video/loader.py), never a stop of the run. So is a shard rewritten under its URL after its index was read
(another size, a Last-Modified after the index's Date, or through fsspec another info() tag): named, never read at the
old offsets.

Credentials: a URL's userinfo (`user:password@`) and query string (a presigned URL's signature) never leave this
module's requests. A shard is named by its clean URL (scheme, host, path): `RemoteShard`, a `str` whose value is
that clean URL and which carries the full URLs of the tar and its index for the requests alone. So a sample's key,
its quarantine records, log lines, the catalog's files and a checkpoint's data state see the clean URL only, equal
across runs, ranks and fresh signatures. URLs with credentials come from a list file (`resolve_remote`), never from
the config itself, which a run saves with its checkpoints.
"""
from __future__ import annotations

import base64
import datetime
import email.utils
import http.client
import os
import random
import re
import select
import socket
import threading
import time
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
_TUNNEL_REFUSED = re.compile(r"^Tunnel connection failed: (40[37])\b")     # http.client's words for a proxy's no


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
    """A failure worth another try (5xx, connection error, timeout, short read); `wait`: the seconds the server asked
    to wait before it (Retry-After), None where it said nothing."""

    def __init__(self, message: str, wait: float | None = None) -> None:
        super().__init__(message)
        self.wait = wait


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
    version: dict | None  # what its reads check the tar against (load_index's object_version), None where nothing

    def __new__(cls, url: str, index_url: str | None = None) -> "RemoteShard":
        self = super().__new__(cls, clean_url(url))
        self.url = url
        self.index_url = index_url or index_url_of(url)
        self.size = self.version = None
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
# requests: keep-alive connections, per process
# ---------------------------------------------------------------------------------------------

_REDIRECTS = {301, 302, 303, 307, 308}
_USER_AGENT = "keye-train"      # urllib sent its own (Python-urllib/3.x); some front-ends refuse a request without one
_MAX_REDIRECTS = 10


class _Pool:
    """This process's idle keep-alive connections, by (scheme, host, port, proxy). A request takes one (or opens
    one), and gives it back only once its answer was read to the end and the server keeps it open (not HTTP/1.0, no
    `Connection: close`); after an error, a short or cut read, it is closed. One connection serves one request at a
    time (a thread takes it out of the pool). Made anew in a forked child (its pid differs): a DataLoader worker
    never writes to its parent's sockets; a spawned one starts empty."""

    IDLE_S = 30.0      # an idle connection older than this is closed unused: a front-end or a NAT may have dropped
                       # it without a word, and a request on it would wait out remote_timeout_s; each give() closes
                       # those of every host (at most once in IDLE_S / 2), so that a host no longer read from does not
                       # keep its sockets (thousands of processes x 16 on the store's front-end) for the whole run
    MAX_IDLE = 32      # idle connections kept per host (the catalog's index readers use 16 at once; close_idle()
                       # closes them once the catalog is read: a worker reads members over one per host)

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.idle: dict[tuple, list[tuple[float, http.client.HTTPConnection]]] = {}
        self.swept = time.monotonic()

    def take(self, key: tuple) -> http.client.HTTPConnection | None:
        now = time.monotonic()
        while True:
            with self.lock:
                kept = self.idle.get(key)
                if not kept:
                    return None
                since, conn = kept.pop()
            # a server that closed it (an idle close, `Connection: close` sent late) left it readable: EOF
            if now - since < self.IDLE_S and conn.sock is not None and not _readable(conn.sock):
                return conn
            conn.close()

    def give(self, key: tuple, conn: http.client.HTTPConnection) -> None:
        now = time.monotonic()
        old: list = []
        with self.lock:
            kept = self.idle.setdefault(key, [])
            if len(kept) < self.MAX_IDLE:
                kept.append((now, conn))
                conn = None
            if now - self.swept > self.IDLE_S / 2:
                self.swept = now
                for k, pairs in self.idle.items():
                    old += [c for since, c in pairs if now - since >= self.IDLE_S]
                    pairs[:] = [(since, c) for since, c in pairs if now - since < self.IDLE_S]
        for c in old + ([conn] if conn is not None else []):
            c.close()

    def close_idle(self) -> None:
        with self.lock:
            old = [c for pairs in self.idle.values() for _, c in pairs]
            self.idle.clear()
        for c in old:
            c.close()


_POOL: _Pool | None = None


def _pool() -> _Pool:
    global _POOL
    pool = _POOL
    if pool is None or pool.pid != os.getpid():
        pool = _POOL = _Pool()
    return pool


def close_idle() -> None:
    """Close this process's idle connections (after a burst of requests that will not come again soon, such as the
    catalog's index reads)."""
    _pool().close_idle()


def _readable(sock) -> bool:
    """Whether an idle connection has something to read (the server's close, or bytes it should not have sent). poll,
    not select: select refuses a descriptor past 1023, which a trainer's process may well hold."""
    try:
        p = select.poll()
        p.register(sock, select.POLLIN)
        return bool(p.poll(0))
    except (OSError, ValueError):
        return True


def _create_connection(address, timeout=None, source_address=None):
    """socket.create_connection with the name's lookup under the timeout too (getaddrinfo has none of its own: a
    resolver that does not answer held the request for its own retries, outside remote_timeout_s). The socket is left
    with what remains of the timeout, so that a TLS handshake after it is bounded by the same time."""
    host, port = address
    deadline = time.monotonic() + timeout
    found: list = []
    done = threading.Event()

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
        except BaseException as e:
            found.append(e)
        done.set()
    threading.Thread(target=lookup, name="remote-dns", daemon=True).start()
    if not done.wait(timeout):
        raise socket.timeout(f"timed out resolving {host}")
    if isinstance(found[0], BaseException):
        raise found[0]
    err: OSError | None = None
    for af, kind, proto, _, addr in found[0]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        sock = socket.socket(af, kind, proto)
        try:
            sock.settimeout(left)
            if source_address:
                sock.bind(source_address)
            sock.connect(addr)
            sock.settimeout(max(1e-3, deadline - time.monotonic()))
            return sock
        except OSError as e:
            sock.close()
            err = e
    raise err if err is not None else OSError(f"{host}: no address")


def _proxy(sch: str, host: str) -> str | None:
    """The proxy for `sch`://`host` from the environment (http_proxy, https_proxy, no_proxy), as urllib chose it."""
    p = urllib.request.getproxies_environment().get(sch)
    if not p or urllib.request.proxy_bypass_environment(host):
        return None
    return p if "://" in p else "http://" + p


def _connection(key: tuple, timeout: float) -> http.client.HTTPConnection:
    """A new connection for key (scheme, host, port, proxy); not connected yet. Through a proxy: to the proxy, and
    for https a tunnel (CONNECT) with TLS to the store inside it."""
    sch, host, port, proxy = key
    cls = http.client.HTTPSConnection if sch == "https" else http.client.HTTPConnection
    if proxy is None:
        conn = cls(host, port, timeout=timeout)
    else:
        p = urllib.parse.urlsplit(proxy)
        conn = cls(p.hostname, p.port or 80, timeout=timeout)
        if sch == "https":
            conn.set_tunnel(host, port, headers=_proxy_auth(p))
    conn._create_connection = _create_connection
    return conn


def _proxy_auth(p: urllib.parse.SplitResult) -> dict:
    if p.username is None:
        return {}
    user, pw = urllib.parse.unquote(p.username), urllib.parse.unquote(p.password or "")
    return {"Proxy-Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}


def _host(url: str) -> tuple:
    u = urllib.parse.urlsplit(url)
    return u.scheme.lower(), (u.hostname or "").lower(), u.port


def _left(deadline: float, opts: RemoteOptions) -> float:
    """The socket timeout for the next wait: remote_timeout_s, or what is left of the request's time if less."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("timed out")
    return min(opts.timeout_s, left)


class _Answer:
    """A response being read, with the connection it came on (given back to the pool by `close` where it may be)."""

    def __init__(self, key: tuple, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, sock) -> None:
        self.key, self.conn, self.resp, self.sock = key, conn, resp, sock
        self.status, self.reason, self.headers = resp.status, resp.reason, resp.headers

    def close(self) -> None:
        r = self.resp
        whole = r.isclosed() or (not r.chunked and r.length == 0)
        r.close()
        if whole and not r.will_close and self.conn.sock is not None:
            _pool().give(self.key, self.conn)
        else:
            self.conn.close()

    def drop(self) -> None:
        self.resp.close()
        self.conn.close()


def _send(url: str, headers: dict, opts: RemoteOptions, deadline: float) -> _Answer:
    """The answer to GET `url` (its userinfo as Basic authorization) on a kept connection or a new one, following
    redirects (the Range header with them; the Authorization header only to the same host). A kept connection that
    fails before any answer (the server had closed it) is tried once more on a new one, which is not a retry."""
    first = url
    auth = None
    u = urllib.parse.urlsplit(url)
    if u.username is not None or u.password is not None:
        user, pw = urllib.parse.unquote(u.username or ""), urllib.parse.unquote(u.password or "")
        auth = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
    for _ in range(_MAX_REDIRECTS + 1):
        u = urllib.parse.urlsplit(url)
        sch = u.scheme.lower()
        port = u.port or (443 if sch == "https" else 80)
        key = (sch, (u.hostname or "").lower(), port, _proxy(sch, u.hostname or ""))
        hostport = u.netloc.rpartition("@")[2]
        hdrs = dict(headers, Host=hostport, **{"User-Agent": _USER_AGENT})
        if auth is not None:
            hdrs["Authorization"] = auth
        target = urllib.parse.urlunsplit(("", "", u.path or "/", u.query, ""))
        if key[3] is not None and sch == "http":      # through a plain proxy: the whole URL, its credentials too
            target = urllib.parse.urlunsplit((sch, hostport, u.path or "/", u.query, ""))
            hdrs.update(_proxy_auth(urllib.parse.urlsplit(key[3])))
        ans = _exchange(key, target, hdrs, opts, deadline)
        loc = ans.headers.get("Location")
        if ans.status not in _REDIRECTS or not loc:
            return ans
        if (ans.resp.length or 0) <= 64 << 10:       # a redirect's small body: read, so its connection is kept
            ans.resp.read(64 << 10)
        ans.close()
        new = urllib.parse.urljoin(url, loc)
        if scheme(new) not in HTTP_SCHEMES:
            raise RemoteError(f"{clean_url(first)}: redirected to a {scheme(new)}:// URL", status=ans.status)
        if _host(new) != _host(url):
            auth = None
        url = new
    raise RemoteError(f"{clean_url(first)}: more than {_MAX_REDIRECTS} redirects", status=ans.status)


def _exchange(key: tuple, target: str, hdrs: dict, opts: RemoteOptions, deadline: float) -> _Answer:
    pool = _pool()
    for kept in (True, False):
        conn = pool.take(key) if kept else None
        if conn is None:
            kept = False
            conn = _connection(key, _left(deadline, opts))
            try:
                conn.connect()
            except (socket.timeout, TimeoutError):
                conn.close()
                raise
            except OSError as e:
                conn.close()
                if _TUNNEL_REFUSED.match(str(e)):     # _classify names it, with the URL
                    raise
                raise _Retry(f"connection failed ({type(e).__name__}: {_scrub(str(e))[:200]})") from None
        try:
            sock = conn.sock           # the response's too (a closing answer takes it off the connection)
            sock.settimeout(_left(deadline, opts))
            conn.request("GET", target, headers=hdrs)
            return _Answer(key, conn, conn.getresponse(), sock)
        except (socket.timeout, TimeoutError):
            conn.close()
            raise
        except (ConnectionError, HTTPException, OSError):
            conn.close()
            if not kept:
                raise
    raise AssertionError("unreachable")


def _with_retries(what: str, opts: RemoteOptions, attempt: Callable[[], object]):
    """attempt() until it returns, raises RemoteError (final), or has raised _Retry opts.retries + 1 times. The wait
    before a retry is the backoff, or what the server asked (Retry-After) where that is longer, drawn from 1x to
    1.2x of it (ranks throttled together do not come back together), at most remote_timeout_s: a throttled request
    never waits longer than one that gets no answer. A longer ask is said in the failure's message."""
    last = ""
    for k in range(opts.retries + 1):
        wait = None
        try:
            return attempt()
        except _Retry as e:
            last, wait = str(e), e.wait
        if k < opts.retries:
            delay = opts.backoff_s * (2 ** k) * random.uniform(0.5, 1.5)
            if wait is not None:
                delay = max(delay, min(wait * random.uniform(1.0, 1.2), opts.timeout_s))
            time.sleep(delay)
    raise RemoteError(f"{what}: {last} ({opts.retries + 1} tries)")


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds, or an HTTP date (its wait from now, at least 0);
    None for none or a value that is neither."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    when = _http_time(value)
    return None if when is None else max(0.0, when - time.time())


def _status_error(ans: _Answer, what: str, opts: RemoteOptions) -> Exception:
    """An HTTP error answer as _Retry (5xx, 429) or a final RemoteError."""
    reason = f"HTTP {ans.status} {ans.reason}"
    if ans.status in _RETRY_STATUS:
        wait = _retry_after(ans.headers.get("Retry-After"))
        if wait is not None and wait > opts.timeout_s:
            reason += (f" (the server asked for a wait of {wait:.0f} s, Retry-After; a retry waits at most "
                       f"remote_timeout_s = {opts.timeout_s:g} s)")
        return _Retry(reason, wait)
    return RemoteError(f"{what}: {reason}", status=ans.status, gone=ans.status in _GONE_STATUS,
                       refused=ans.status in _REFUSED_STATUS)


def _classify(e: BaseException, what: str) -> Exception:
    """The exception of a failed request as _Retry or a final RemoteError, naming `what` (the clean URL and range)."""
    if isinstance(e, (socket.timeout, TimeoutError)):
        return _Retry("timed out")
    if isinstance(e, http.client.InvalidURL):      # its message quotes the path and query (a signature): not kept
        return RemoteError(f"{what}: the URL holds characters that a request cannot carry (control characters or "
                           f"spaces; percent-encode them)")
    text = _scrub(str(e))[:200]
    refused = _TUNNEL_REFUSED.match(str(e))
    if refused:
        return RemoteError(f"{what}: the https_proxy refuses the tunnel ({text}): its credentials or its rules; no "
                           f"read can pass", status=int(refused.group(1)), refused=True)
    if isinstance(e, (ConnectionError, HTTPException, OSError)):
        return _Retry(f"{type(e).__name__}: {text}")
    return RemoteError(f"{what}: {type(e).__name__}: {text}")


def _scrub(text: str) -> str:
    """`text` with every URL in it clean, and a path's query string cut (an error of http.client or of an fsspec
    backend may quote the URL or the request's path it was given)."""
    text = re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+", lambda m: clean_url(m.group(0)), text)
    return re.sub(r"(/[^\s'\"?#]*)[?#][^\s'\"]*", r"\1", text)


def _request_deadline(t0: float, n: int | None, opts: RemoteOptions) -> float:
    """When a request sent at t0 for `n` bytes must be done: remote_timeout_s for each MiB (at least one), the
    connection, the name's lookup and the wait for the answer included."""
    return t0 + opts.timeout_s * max(1, -(-(n or 0) // _MIB))


def http_get(url: str, opts: RemoteOptions, headers: dict | None = None) -> bytes:
    """The whole body of `url` (a shard's index, a list file), retried as the module says; `headers`, where given,
    gets the answer's headers."""
    what = clean_url(url)

    def attempt() -> bytes:
        ans = None
        try:
            t0 = time.monotonic()
            ans = _send(url, {}, opts, _request_deadline(t0, None, opts))
            if not 200 <= ans.status < 300:
                raise _status_error(ans, what, opts)
            want = ans.headers.get("Content-Length")
            n = int(want) if want is not None and want.isdigit() else None
            parts: list[bytes] = []
            got = _read_body(ans, n, t0, opts, parts.append)
            if n is not None and got != n:
                raise _Retry(f"short read ({got} of {want} bytes)")
            if headers is not None:
                headers.update(ans.headers.items())
            ans.close()
            ans = None
            return b"".join(parts)
        except (_Retry, RemoteError):
            raise
        except Exception as e:
            raise _classify(e, what) from None
        finally:
            if ans is not None:
                ans.drop()
    return _with_retries(what, opts, attempt)


_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_OBJECT_SIZE = re.compile(r"^bytes (?:\d+-\d+|\*)/(\d+)$")      # the total of a Content-Range (206, or 416's */N)
_MIB = 1 << 20


def _read_body(ans: _Answer, n: int | None, t0: float, opts: RemoteOptions, sink: Callable[[bytes], None],
               chunk: int = _MIB) -> int:
    """Up to `n` bytes (all, for None) of the answer `ans` to a request sent at `t0`, given to `sink` as they come
    (read1: whatever arrived); the count given. _Retry once the request has taken remote_timeout_s for each MiB it
    asks for (at least one): a floor of 1 MiB per timeout (17 KB/s at 60 s) that only a server trickling its bytes,
    each within the timeout of the last, stays under (it would hold the worker for hours). No wait on the socket
    goes past that time."""
    deadline = _request_deadline(t0, n, opts)
    got = 0

    def too_slow() -> _Retry:
        return _Retry(f"too slow ({got} bytes in {time.monotonic() - t0:.1f} s; remote_timeout_s = "
                      f"{opts.timeout_s:g} s a MiB)")
    while n is None or got < n:
        try:
            if ans.sock is not None:
                ans.sock.settimeout(_left(deadline, opts))
            buf = ans.resp.read1(chunk if n is None else min(chunk, n - got))
        except (socket.timeout, TimeoutError):
            if time.monotonic() >= deadline - 1e-3:
                raise too_slow() from None
            raise
        if not buf:
            break
        sink(buf)
        got += len(buf)
        if time.monotonic() > deadline and (n is None or got < n):
            raise too_slow()
    return got


def http_read_range(url: str, offset: int, size: int, opts: RemoteOptions, sink: Callable[[bytes], None],
                    chunk: int = 1 << 20, total: int | None = None, version: dict | None = None) -> None:
    """Bytes [offset, offset + size) of `url`, given to `sink` in order; a retry asks for the bytes not yet given.
    total: the object's size as its shard index says; a Content-Range of another total is a shard rewritten since
    (RemoteError: its members are no longer where the index says). version: what load_index saw (`read_at`: when
    the index was read, by the store's clock); an answer whose Last-Modified is later is a shard rewritten since, at
    the same size too (a tar is padded to 10 KiB records: a video re-encoded a little smaller or larger leaves it)."""
    if size <= 0:
        return
    done = [0]
    what = f"{clean_url(url)} bytes={offset}-{offset + size - 1}"

    def attempt() -> None:
        a, b = offset + done[0], offset + size - 1
        t0 = time.monotonic()
        ans = None
        try:
            ans = _send(url, {"Range": f"bytes={a}-{b}"}, opts, _request_deadline(t0, b + 1 - a, opts))
            # the object's size first: a shard rewritten shorter answers a member across its end with other
            # bounds, and one past its end with 416 (`Content-Range: bytes */SIZE`)
            has = _OBJECT_SIZE.match(ans.headers.get("Content-Range", "").strip())
            if total is not None and has and int(has.group(1)) != total and ans.status in (206, 416):
                raise RemoteError(f"{what}: the object has {has.group(1)} bytes, its shard index says {total}: "
                                  f"the shard was rewritten after its index was read (objects are taken as "
                                  f"immutable: a new shard name, or a fresh data.video.index_dir)",
                                  status=ans.status)
            if not 200 <= ans.status < 300:
                raise _status_error(ans, what, opts)
            if ans.status != 206:
                raise RemoteError(f"{what}: HTTP {ans.status} to a Range request (the server must answer 206 "
                                  f"Partial Content)", status=ans.status, refused=True)
            changed = _modified_since(ans.headers.get("Last-Modified"), version)
            if changed:
                raise RemoteError(f"{what}: {changed}: the shard was rewritten after its index was read (objects "
                                  f"are taken as immutable: a new shard name, or a fresh data.video.index_dir)",
                                  status=ans.status)
            cr = _CONTENT_RANGE.match(ans.headers.get("Content-Range", "").strip())
            if not cr or (int(cr.group(1)), int(cr.group(2))) != (a, b):
                raise RemoteError(f"{what}: Content-Range {ans.headers.get('Content-Range')!r} for bytes={a}-{b}",
                                  status=ans.status)

            def give(buf: bytes) -> None:
                _give(sink, buf)
                done[0] += len(buf)
            _read_body(ans, size - done[0], t0, opts, give, chunk)
            if done[0] < size:
                raise _Retry(f"short read ({done[0]} of {size} bytes)")
            ans.close()
            ans = None
        except (_Retry, RemoteError, _SinkError):
            raise
        except Exception as e:
            raise _classify(e, what) from None
        finally:
            if ans is not None:
                ans.drop()
    _receive(what, opts, attempt)


MODIFIED_SLACK_S = 5.0
"""How much later than its index's reading a tar's Last-Modified may be without counting as rewritten: the store's
clocks (the index answer's Date, the object's Last-Modified) count whole seconds and need not agree to the second;
an ingest run just before the catalog is read must not fail its own shards."""


def _http_time(value: str | None) -> float | None:
    """An HTTP date as seconds since the epoch; None for none or a value that is not one."""
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _modified_since(last_modified: str | None, version: dict | None) -> str:
    """What says that an object was changed after its index was read (version["read_at"]), or ""."""
    read_at = (version or {}).get("read_at")
    lm = _http_time(last_modified)
    if read_at is None or lm is None or lm <= read_at + MODIFIED_SLACK_S:
        return ""
    return f"the object was modified at {_utc(lm)}, its shard index was read at {_utc(read_at)}"


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


_BUGS = (TypeError, AttributeError, NameError, ImportError, AssertionError)    # raised as they are, never retried


def _fs_attempt(what: str, fn):
    """fn() with an fsspec backend's failure as _Retry or a final RemoteError. A backend raises its own classes, not
    always OSError (gcsfs's HttpError, botocore's connection errors once s3fs's own retries are spent): those are
    tried again too, then the sample's failure, never an exception out of the loader."""
    try:
        return fn()
    except (_Retry, _SinkError, RemoteError):
        raise
    except FileNotFoundError:
        raise RemoteError(f"{what}: not found", gone=True) from None
    except PermissionError as e:
        raise RemoteError(f"{what}: permission denied ({_scrub(str(e))[:200]})", refused=True) from None
    except _BUGS:
        raise
    except Exception as e:
        raise _Retry(f"{type(e).__name__}: {_scrub(str(e))[:200]}") from None


def fs_get(url: str, opts: RemoteOptions) -> bytes:
    fs, path = fsspec_fs(url)
    what = clean_url(url)
    return _with_retries(what, opts, lambda: _fs_attempt(what, lambda: fs.cat_file(path)))


_FS_TAGS = ("ETag", "etag", "md5Hash", "generation", "LastModified", "last_modified", "updated", "mtime", "created")
"""The fields of an fsspec backend's info() that change when an object is written anew (s3fs, gcsfs, adlfs, local and
memory filesystems), the first one present taken."""


def _fs_tag(info: dict) -> str | None:
    for k in _FS_TAGS:
        if info.get(k) is not None:
            return f"{k} {info[k]}"
    return None


def fs_version(url: str, opts: RemoteOptions) -> dict | None:
    """What identifies the object at `url` now (its info()'s ETag, generation or modification time), or None where it
    cannot be asked: a shard index records it for fs_read_range's check."""
    fs, path = fsspec_fs(url)
    what = clean_url(url)
    try:
        info = _with_retries(what, opts, lambda: _fs_attempt(what, lambda: fs.info(path)))
    except RemoteError:
        return None
    tag = _fs_tag(info)
    return None if tag is None else {"tag": tag}


_FS_CHECKED: tuple[int, set] = (-1, set())     # (pid, the clean URLs whose object this process checked)


def _fs_changed(fs, path: str, total: int | None, version: dict | None) -> str:
    """What says that the object at `path` is not the one its index was read for (its size, its tag), or ""."""
    fs.invalidate_cache(path)                  # a size listed when the shards were found is not the object's now
    info = fs.info(path)
    has, tag, now = info.get("size"), (version or {}).get("tag"), _fs_tag(info)
    if total is not None and has is not None and has != total:
        return f"the object has {has} bytes, its shard index says {total}"
    if tag is not None and now is not None and now != tag:
        field, value = now.split(" ", 1)
        return f"the object's {field} is {value}, {tag.split(' ', 1)[1]} when its shard index was read"
    return ""


def fs_read_range(url: str, offset: int, size: int, opts: RemoteOptions, sink: Callable[[bytes], None],
                  chunk: int = 8 << 20, total: int | None = None, version: dict | None = None) -> None:
    """As http_read_range, through fsspec (`cat_file` of a range, in chunks). A backend gives no Content-Range or
    Last-Modified with the bytes: the first read of each shard in a process asks its info() (one request per shard
    and process) and compares its size with `total` (the tar's size as its index says) and its tag with `version`
    (fs_version when the index was read): a shard rewritten since, longer, shorter or the same size, is a
    RemoteError naming what changed. A short answer is tried again; where the object is then smaller than `total`,
    the same error. (A shard rewritten during a process's reads, after its first, is seen only where it is shorter.)"""
    if size <= 0:
        return
    fs, path = fsspec_fs(url)
    clean = clean_url(url)
    what = f"{clean} bytes={offset}-{offset + size - 1}"
    done = [0]

    def rewritten(why: str) -> RemoteError:
        return RemoteError(f"{what}: {why}: the shard was rewritten after its index was read (objects are taken as "
                           f"immutable: a new shard name, or a fresh data.video.index_dir)")

    def attempt() -> None:
        global _FS_CHECKED
        if _FS_CHECKED[0] != os.getpid():
            _FS_CHECKED = (os.getpid(), set())
        if (total is not None or version is not None) and clean not in _FS_CHECKED[1]:
            why = _fs_changed(fs, path, total, version)
            if why:
                raise rewritten(why)
            _FS_CHECKED[1].add(clean)
        while done[0] < size:
            n = min(chunk, size - done[0])
            buf = fs.cat_file(path, start=offset + done[0], end=offset + done[0] + n)
            if len(buf) != n:
                why = _fs_changed(fs, path, total, None) if total is not None else ""
                if why:
                    raise rewritten(why)
                raise _Retry(f"short read ({done[0] + len(buf)} of {size} bytes)" if len(buf) < n
                             else f"{len(buf)} bytes for {n} asked")
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

def get(url: str, opts: RemoteOptions, headers: dict | None = None) -> bytes:
    return http_get(url, opts, headers) if scheme(url) in HTTP_SCHEMES else fs_get(url, opts)


def read_range(url: str, offset: int, size: int, opts: RemoteOptions, sink: Callable[[bytes], None],
               total: int | None = None, version: dict | None = None) -> None:
    if scheme(url) in HTTP_SCHEMES:
        http_read_range(url, offset, size, opts, sink, total=total, version=version)
    else:
        fs_read_range(url, offset, size, opts, sink, total=total, version=version)


def load_index(shard: str, opts: RemoteOptions) -> tuple[bytes, dict | None]:
    """The bytes of the shard index (`<shard>.idx.json`) of a shard on object storage (data/video/shards.py parses
    and checks them), and its `object_version` (not in the file): what the reads check the tar against, None where
    nothing can be: for http(s), when the index was read (the answer's Date, the store's clock); through fsspec, the
    tar's tag now. ValueError naming its clean URL when it is not there (a shard on object storage is not scanned:
    that would read the whole tar)."""
    url = full_index_url(shard)
    headers: dict = {}
    try:
        data = get(url, opts, headers)
    except RemoteError as e:
        why = ("not found: upload the .idx.json that launch/ingest.py writes beside each tar"
               if e.gone else str(e))
        raise ValueError(f"shard index {clean_url(url)} of {shard}: {why}") from None
    if scheme(url) in HTTP_SCHEMES:
        read_at = _http_time(headers.get("Date"))
        return data, None if read_at is None else {"read_at": read_at}
    return data, fs_version(full_url(shard), opts)
