"""Shards on object storage (data/video/remote.py): the session's shards served by a small threaded HTTP server
started here (stdlib http.server with Range support written below, and faults injected per request), or put in
fsspec's memory filesystem.

Reference: the same shards read from the local files. Every pack (tokens, labels, positions, pixels, keys) must be
bit-identical, and so must the loader's state; faults must cost the sample alone (quarantined, naming the URL and
the status) or, before training, stop the launch naming the URL; no credential may reach a key, record, log or the
catalog's files.
"""
import http.server
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from data.exclude import read_exclude
from data.held_out import held_out_sets
from data.video.config import VideoDataConfig
from data.video.loader import VideoPackedLoader
from data.video.remote import RemoteError, RemoteOptions, RemoteShard, clean_url, expand_braces, http_read_range
from data.video.shards import load_catalog, probe_remote, read_member, resolve_shards

from .conftest import read_jsonl, small_cfg
from .test_loader import signature, take

SECRET = "sig=S3CR3T"
AUTH = "user:pa55@"


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET of a file under the server's root, one `bytes=a-b` range answered 206 with its Content-Range. Faults, by
    path, one per request in order: "503", "404", "403", "drop" (headers and half the body, then the connection closed),
    "hang" (no answer for `hang_s`), "slow" (the answer after 0.3 s), "trickle" (a byte every 50 ms),
    "ignore_range" (200 and the whole file), "redirect" (302 to the same path on `elsewhere`), "eof" (the
    connection closed without an answer, as a server closing a kept connection the moment a request came), "429 N" /
    "503 N" (that status with `Retry-After: N`).

    HTTP/1.1 with keep-alive, as a store's front-end; `srv.mode` "http10" answers HTTP/1.0 (no keep-alive),
    "close" sends `Connection: close`, and a connection idle for `srv.idle_s` is closed. `srv.connections` counts the
    TCP connections accepted, `srv.open` those not yet closed."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True     # headers and body are two writes: Nagle held the body for the client's ACK

    def setup(self):
        self.timeout = self.server.owner.idle_s
        super().setup()
        with self.server.owner.lock:
            self.server.owner.connections += 1
            self.server.owner.open += 1

    def finish(self):
        super().finish()
        with self.server.owner.lock:
            self.server.owner.open -= 1

    def send_response(self, code, message=None):
        if self.server.owner.mode == "http10":
            self.protocol_version = "HTTP/1.0"
            self.close_connection = True
        super().send_response(code, message)
        if self.server.owner.mode == "close":
            self.send_header("Connection", "close")

    def do_GET(self):
        srv = self.server.owner
        u = urllib.parse.urlsplit(self.path)
        srv.log.append((self.path, self.headers.get("Range"), self.headers.get("Authorization")))
        srv.stamps.append(time.monotonic())
        auth = self.headers.get("Authorization")
        if srv.require is not None and (u.query != srv.require[0] or auth != srv.require[1]):
            return self.send_error(403)
        todo = srv.faults.get(u.path)
        fault = todo.pop(0) if todo else None
        if fault in ("hang", "eof"):
            time.sleep(srv.hang_s if fault == "hang" else 0)
            self.close_connection = True
            return
        if fault == "slow":          # answered, late
            time.sleep(0.3)
        if fault == "redirect":     # to the same path on srv.elsewhere (another host: another port)
            self.send_response(302)
            self.send_header("Location", f"{srv.elsewhere}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if fault in ("503", "404", "403"):
            return self.send_error(int(fault))
        if fault and fault[:4] in ("429 ", "503 "):      # throttled: the status, then the Retry-After value
            self.send_response(int(fault[:3]))
            self.send_header("Retry-After", fault[4:])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        f = srv.root / u.path.lstrip("/")
        if not f.is_file():
            return self.send_error(404)
        data = f.read_bytes()
        rng = self.headers.get("Range")
        if rng and fault != "ignore_range":
            a, b = (int(x) for x in rng.split("=", 1)[1].split("-"))
            if a >= len(data):         # past the end: 416, naming the object's size, as a store answers
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = data[a:b + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{a + len(body) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Last-Modified", self.date_time_string(f.stat().st_mtime))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault == "trickle":      # a byte every 50 ms: each within the timeout of the last
            for i in range(len(body)):
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                time.sleep(0.05)
            return
        if fault == "drop":
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)

    def date_time_string(self, timestamp=None):     # the Date header on a clock `srv.date_offset` s off
        return super().date_time_string(time.time() + self.server.owner.date_offset if timestamp is None else timestamp)

    def log_message(self, *args):
        pass


class Server:
    def __init__(self, root: Path) -> None:
        self.root, self.faults, self.log, self.require, self.hang_s, self.stamps = root, {}, [], None, 1.0, []
        self.elsewhere, self.mode, self.idle_s, self.connections, self.lock = "", "", None, 0, threading.Lock()
        self.date_offset, self.open = 0.0, 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *a: None       # a hung answer's client left: no traceback
        self.httpd.owner = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def reset(self) -> None:
        self.faults, self.log, self.require, self.mode, self.idle_s, self.stamps = {}, [], None, "", None, []
        self.date_offset = 0.0


@pytest.fixture(scope="module")
def server(shard_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    (root / "d").symlink_to(shard_dir)
    s = Server(root)
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def srv(server):
    server.reset()
    yield server
    server.reset()


def tars(shard_dir) -> list[str]:
    return sorted(p.name for p in Path(shard_dir).glob("*.tar"))


def brace_spec(server, shard_dir) -> str:
    return f"{server.url}/d/shard-{{000000..{len(tars(shard_dir)) - 1:06d}}}.tar"


def rcfg(spec, tmp_path, **kw):
    kw = dict(dict(decode_isolation="inline", remote_timeout_s=2.0, remote_retries=2, remote_backoff_s=0.01), **kw)
    return small_cfg(spec, tmp_path, **kw)


def test_brace_lists_and_urls_name_shards_without_credentials():
    assert expand_braces("https://h/d/shard-{000008..000011}.tar") == [
        f"https://h/d/shard-{i:06d}.tar" for i in (8, 9, 10, 11)]
    assert expand_braces("s3://b/{web,howto}/s-{1..2}.tar") == [
        "s3://b/web/s-1.tar", "s3://b/web/s-2.tar", "s3://b/howto/s-1.tar", "s3://b/howto/s-2.tar"]
    with pytest.raises(ValueError, match="counts down"):
        expand_braces("x-{3..1}.tar")
    assert clean_url(f"https://{AUTH}Bucket.example.com:8443/d/s.tar?{SECRET}#x") == \
        "https://bucket.example.com:8443/d/s.tar"
    # a credential in the config itself would be saved with the run: refused, naming a list file
    for field in ("shards", "long_shards", "eval_shards"):
        with pytest.raises(ValueError, match=rf"VideoDataConfig.{field}: 'https://h/d/s.tar' carries credentials"
                                             r".*list file") as e:
            VideoDataConfig(**{field: f"/x,val=https://h/d/s.tar?{SECRET}" if field == "eval_shards"
                               else f"https://{AUTH}h/d/s.tar"})
        assert "S3CR3T" not in str(e.value) and "pa55" not in str(e.value)
    with pytest.raises(ValueError, match="an HTTP server's folder cannot be listed"):
        resolve_shards("https://h/d/")
    # held-out sets by name, a brace list's comma splitting nothing
    assert held_out_sets("val=https://h/d/s-{0,1}.tar,web=https://h/w/{a,b}.tar", field_name="e") == [
        ("val", "https://h/d/s-{0,1}.tar"), ("web", "https://h/w/{a,b}.tar")]
    assert resolve_shards("https://h/w/{a,b}.tar,/nonexistent/*.tar") == ["https://h/w/a.tar", "https://h/w/b.tar"]


def test_url_shards_give_the_packs_and_state_of_the_local_shards(shard_dir, srv, tmp_path):
    """A brace list of http:// shards: one GET per shard index, one Range request per video, and packs bit-identical
    to the local shards' (pixels too), with the same fingerprints, so a run may move its data either way."""
    local = VideoPackedLoader(rcfg(shard_dir, tmp_path), seed=3)
    remote = VideoPackedLoader(rcfg(brace_spec(srv, shard_dir), tmp_path), seed=3)
    n_idx = len(srv.log)
    assert n_idx == len(tars(shard_dir)) and all(r is None and p.endswith(".idx.json") for p, r, _ in srv.log)
    packs = take(local, 3)
    assert all(p.num_docs and p.pixel_values.shape[0] for p in packs)       # videos decoded: pixels to compare
    assert [signature(p) for p in take(remote, 3)] == [signature(p) for p in packs]
    members = srv.log[n_idx:]
    assert members and all(r is not None and r.startswith("bytes=") for _, r, _ in members)
    a, b = local.state_dict(), remote.state_dict()
    assert (a["catalog_fingerprint"], a["plan_fingerprint"], a["base"]) == \
        (b["catalog_fingerprint"], b["plan_fingerprint"], b["base"])
    # and the local loader continues the remote one's state exactly
    cont = VideoPackedLoader(rcfg(shard_dir, tmp_path), seed=3)
    cont.load_state_dict(remote.state_dict())
    assert signature(next(cont)) == signature(next(local))
    # data.exclude names a URL shard's sample by its key, or by its whole URL
    first = remote.planner.catalog[remote.planner.epoch(0).packs[0][0]]
    key = f"{Path(first.shard).name}/{first.key}"
    for line in (key, f"{first.shard}/{first.key}"):
        (tmp_path / "x.txt").write_text(line + "\n")
        ex = VideoPackedLoader(rcfg(brace_spec(srv, shard_dir), tmp_path), seed=3,
                               exclude=read_exclude(str(tmp_path / "x.txt")))
        pack = next(ex)
        assert ex.unmatched == [] and pack.excluded == [key] and key not in pack.sample_keys, line


def test_a_503_or_a_dropped_connection_is_retried_and_the_pack_is_unchanged(shard_dir, srv, tmp_path):
    """503 then success, and a connection dropped mid-body (the retry asks only for the bytes not received): the
    same packs as the local shards, nothing quarantined."""
    want = [signature(p) for p in take(VideoPackedLoader(rcfg(shard_dir, tmp_path), seed=3), 2)]
    remote = VideoPackedLoader(rcfg(brace_spec(srv, shard_dir), tmp_path), seed=3)
    for name in tars(shard_dir):
        srv.faults[f"/d/{name}"] = ["503", "drop"]
    srv.log.clear()
    assert [signature(p) for p in take(remote, 2)] == want
    assert remote.stats.get("samples_failed", 0) == 0 and not read_jsonl(tmp_path / "quarantine.jsonl")
    # after a dropped body the retry resumes at the byte where it stopped
    ranges = [(p, r) for p, r, _ in srv.log if r]
    resumed = [(r1, r2) for (p1, r1), (p2, r2) in zip(ranges, ranges[1:]) if p1 == p2
               and r1.split("-")[1] == r2.split("-")[1] and int(r2[6:].split("-")[0]) > int(r1[6:].split("-")[0])]
    assert resumed, ranges[:6]


@pytest.mark.parametrize("fault", ["hang", "503"])
def test_a_sample_whose_reads_keep_failing_is_quarantined_naming_the_url(shard_dir, srv, tmp_path, fault):
    """A server that hangs past the timeout or keeps answering 503: the sample is left out and quarantined
    (read_error, its URL and status), the pack still comes, the run goes on."""
    remote = VideoPackedLoader(rcfg(brace_spec(srv, shard_dir), tmp_path, remote_timeout_s=0.3, remote_retries=1),
                               seed=3)
    srv.hang_s = 1.0
    first = remote.planner.catalog[remote.planner.epoch(0).packs[0][0]]
    srv.faults[urllib.parse.urlsplit(first.shard).path] = [fault] * 2
    t0 = time.perf_counter()
    pack = next(remote)
    assert time.perf_counter() - t0 < 10
    rec = [r for r in read_jsonl(tmp_path / "quarantine.jsonl") if r["key"] == first.key]
    assert len(rec) == 1 and rec[0]["reason"] == "read_error" and rec[0]["stage"] == "decode", rec
    why = {"hang": "timed out (2 tries)", "503": "HTTP 503 Service Unavailable (2 tries)"}[fault]
    assert f"{first.shard} bytes={first.video_offset}-" in rec[0]["detail"] and why in rec[0]["detail"], rec
    assert pack.failures and first.key not in [k.rsplit("/", 1)[1] for k in pack.sample_keys]
    assert next(remote).num_docs >= 1                  # the run goes on


def test_a_local_list_file_names_shards_relative_to_itself(shard_dir, tmp_path):
    for name in tars(shard_dir)[:2]:
        for ext in (".tar", ".idx.json"):
            (tmp_path / f"{name[:-4]}{ext}").symlink_to(Path(shard_dir) / f"{name[:-4]}{ext}")
    (tmp_path / "list.txt").write_text(f"# two shards\n\n{tars(shard_dir)[1]}\n  {tars(shard_dir)[0]}  \n")
    assert resolve_shards(str(tmp_path / "list.txt")) == [str(tmp_path / n) for n in tars(shard_dir)[:2]]
    assert len(load_catalog(str(tmp_path / "list.txt"))) == len(load_catalog(f"{tmp_path}/*.tar"))


def test_a_missing_index_or_an_empty_list_stops_the_launch_naming_the_url(shard_dir, srv, tmp_path):
    srv.faults["/d/shard-000001.idx.json"] = ["404"]
    with pytest.raises(ValueError, match=rf"VideoDataConfig.shards: shard index {srv.url}/d/shard-000001.idx.json "
                                         rf"of {srv.url}/d/shard-000001.tar: not found"):
        load_catalog(brace_spec(srv, shard_dir), remote=RemoteOptions(timeout_s=2, retries=0))
    # a list file on the server: its lines relative to it; one that is not there is named
    (srv.root / "list.txt").write_text("".join(f"d/{n}\n" for n in tars(shard_dir)))
    assert resolve_shards(f"{srv.url}/list.txt") == [f"{srv.url}/d/{n}" for n in tars(shard_dir)]
    with pytest.raises(ValueError, match=rf"VideoDataConfig.shards: list file {srv.url}/gone.txt: HTTP 404"):
        resolve_shards(f"{srv.url}/gone.txt")
    (tmp_path / "empty.txt").write_text("# no shards yet\n")
    with pytest.raises(ValueError, match=r"VideoDataConfig.shards = '.*empty.txt': no .tar shards found"):
        load_catalog(str(tmp_path / "empty.txt"))
    # a 503 on an index is tried again, and a dead server named with its error after the retries
    srv.faults["/d/shard-000001.idx.json"] = ["503"]
    assert len(load_catalog(brace_spec(srv, shard_dir), remote=RemoteOptions(timeout_s=2, retries=1, backoff_s=0)))
    with pytest.raises(ValueError, match=r"shard index http://127.0.0.1:1/d/s.idx.json of http://127.0.0.1:1/d/s.tar: "
                                         r"http://127.0.0.1:1/d/s.idx.json: connection failed .*\(2 tries\)"):
        load_catalog("http://127.0.0.1:1/d/s.tar", remote=RemoteOptions(timeout_s=1, retries=1, backoff_s=0))


def test_shard_indexes_on_object_storage_are_read_at_once_in_order(shard_dir, srv):
    """Each index answered 0.3 s late: read one after the other, n shards took n x 0.3 s before the first step
    (4096 shards at 50 ms: minutes); read by several threads, about one delay, in the same order as the local
    catalog's (its fingerprint)."""
    n = len(tars(shard_dir))
    for name in tars(shard_dir):
        srv.faults[f"/d/{name[:-4]}.idx.json"] = ["slow"]
    t0 = time.perf_counter()
    cat = load_catalog(brace_spec(srv, shard_dir))
    took = time.perf_counter() - t0
    assert cat.fingerprint == load_catalog(str(shard_dir)).fingerprint and len(cat.shards) == n
    assert n >= 6 and took < 0.3 * n / 2, (n, took)     # half the sequential time: room for a busy machine
    # the readers' connections (one each here) stayed open for the whole run, in a process that reads no more
    # indexes (and in each forked worker until its first read); now closed once the catalog is read
    assert srv.connections >= 2 and _open_after(srv, 0) == 0


def _open_after(srv, want: int, wait_s: float = 2.0) -> int:
    """srv.open once the server has seen the closes (its threads read the EOF): at most `want`, or after wait_s."""
    end = time.monotonic() + wait_s
    while srv.open > want and time.monotonic() < end:
        time.sleep(0.02)
    return srv.open


def test_an_idle_connection_to_a_host_no_longer_read_is_closed(srv, shard_dir, monkeypatch):
    """A kept connection was closed for its age only when its own host was asked again: one to a host no longer
    read from (another bucket's endpoint, a list file's host) stayed open for the run. Each give() now closes the
    idle ones of every host past _Pool.IDLE_S."""
    from data.video import remote as remote_mod

    monkeypatch.setattr(remote_mod._Pool, "IDLE_S", 0.3)
    remote_mod.close_idle()
    assert _open_after(srv, 0) == 0
    opts = RemoteOptions(timeout_s=2, retries=0)
    read_member(RemoteShard(f"{srv.url}/d/shard-000000.tar"), 0, 100, opts)
    time.sleep(0.5)
    other = RemoteShard(f"{srv.url.replace('127.0.0.1', 'localhost')}/d/shard-000000.tar")    # another host's key
    assert read_member(other, 0, 100, opts) == _member(shard_dir, "shard-000000.tar", 0, 100)
    assert _open_after(srv, 1) == 1 and srv.connections >= 2     # the other host's, kept; the first one closed


def test_index_dir_without_locks_keeps_the_url_catalog_on_the_node(shard_dir, srv, tmp_path, monkeypatch, caplog):
    """The trainer keeps the catalog in index_dir, built by one process and mapped by the others. On a shared
    filesystem without flock (Lustre mounted noflock) every process built its own: for URL shards, every rank read
    every shard index from the store (512 ranks x 4096 shards: 2M GETs at start, 16 at once per rank). Now the
    catalog of URL shards goes to a node-local directory instead, and one process per node reads the indexes; without
    an index_dir at all a warning says what it costs."""
    import errno
    import fcntl
    import tempfile

    index_dir = tmp_path / "shared_index"
    real = fcntl.flock

    def flock(f, op):
        if str(index_dir) in getattr(f, "name", ""):
            raise OSError(errno.ENOLCK, "No locks available")
        return real(f, op)
    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node_tmp"))
    (tmp_path / "node_tmp").mkdir()
    spec, n = brace_spec(srv, shard_dir), len(tars(shard_dir))
    ref = load_catalog(str(shard_dir))
    caplog.set_level(logging.WARNING)
    for k in range(2):                      # two processes of one node
        before = len(srv.log)
        cat = load_catalog(spec, index_dir=index_dir)
        assert len(srv.log) - before == (n if k == 0 else 0), k
        assert cat.fingerprint == ref.fingerprint and cat[len(cat) - 1].key == ref[len(ref) - 1].key
    assert "No locks available" in caplog.text and str(tmp_path / "node_tmp") in caplog.text
    caplog.clear()
    load_catalog(spec)                      # one process (a preview, a notebook): nothing to say
    assert not caplog.text
    monkeypatch.setenv("WORLD_SIZE", "16")  # one of a job's processes without index_dir: said
    load_catalog(spec)
    assert "each process reads every shard index" in caplog.text and "index_dir" in caplog.text
    caplog.clear()
    load_catalog(str(shard_dir))            # local shards: as before, nothing said
    assert not caplog.text


def test_a_shard_rewritten_after_its_index_was_read_is_named_not_read_at_old_offsets(shard_dir, srv, tmp_path):
    """Objects are taken as immutable (the catalog's key is the clean URL). A tar rewritten under its URL held other
    bytes at the index's offsets: each Range answer's Content-Range total is checked against the size the index
    recorded, so its samples are quarantined naming the change instead of decoding whatever lies there."""
    import shutil

    (srv.root / "chg").mkdir()
    for p in Path(shard_dir).iterdir():
        shutil.copy(p, srv.root / "chg" / p.name)
    spec = f"{srv.url}/chg/shard-{{000000..{len(tars(shard_dir)) - 1:06d}}}.tar"
    index_dir = tmp_path / "index"
    remote = VideoPackedLoader(rcfg(spec, tmp_path, index_dir=str(index_dir)), seed=3)
    first = remote.planner.catalog[remote.planner.epoch(0).packs[0][0]]
    tar = srv.root / "chg" / Path(first.shard).name
    size = tar.stat().st_size
    tar.write_bytes(b"\0" * 1024 + tar.read_bytes())     # another version: every member 1 KB later
    # a loader that maps the catalog files another process made knows the sizes too
    again = VideoPackedLoader(rcfg(spec, tmp_path, index_dir=str(index_dir)), seed=3)
    for loader in (remote, again):
        failed = [f for f in next(loader).failures if f["key"] == first.key]
        assert len(failed) == 1 and f"the object has {size + 1024} bytes, its shard index says {size}" in \
            failed[0]["detail"], failed
    assert [r["reason"] for r in read_jsonl(tmp_path / "quarantine.jsonl") if r["key"] == first.key] == ["read_error"]
    # rewritten shorter (an upload cut off): a member across the new end came back short under a Content-Range of
    # other bounds, one past it as 416, and neither said why; both now name the sizes, as a longer one does
    shard = RemoteShard(f"{srv.url}/chg/{Path(first.shard).name}")
    shard.size = size
    opts = RemoteOptions(timeout_s=2, retries=0)
    for cut in (first.video_offset + 10, first.video_offset - 10):
        tar.write_bytes(tar.read_bytes()[1024:][:cut])
        with pytest.raises(RemoteError, match=rf"bytes={first.video_offset}-\d+: the object has {cut} bytes, its "
                                              rf"shard index says {size}"):
            read_member(shard, first.video_offset, first.video_size, opts)
        tar.write_bytes(b"\0" * 1024 + (Path(shard_dir) / Path(first.shard).name).read_bytes())


def test_a_shard_rewritten_at_the_same_size_is_named_by_its_date(shard_dir, srv, tmp_path):
    """A shard re-ingested under its URL (one video fixed) keeps its size where the tar's 10 KiB records absorb the
    change; a run resumed on the catalog kept in index_dir read its members at the old offsets: other bytes, no
    error. The index answer's Date (when it was read, by the store's clock) is kept with the catalog; a member's
    answer whose Last-Modified is later names the change. A shard written just before its index was read is not."""
    import shutil

    import os

    (srv.root / "same").mkdir()
    for p in Path(shard_dir).iterdir():
        shutil.copy(p, srv.root / "same" / p.name)
        os.utime(srv.root / "same" / p.name, (time.time() - 3600,) * 2)     # uploaded an hour ago
    spec = f"{srv.url}/same/shard-{{000000..{len(tars(shard_dir)) - 1:06d}}}.tar"
    opts = RemoteOptions(timeout_s=2, retries=0)
    srv.date_offset = -60.0                              # the catalog read a minute before the rewrite
    load_catalog(spec, index_dir=tmp_path / "index", remote=opts)
    srv.date_offset = 0.0
    resumed = VideoPackedLoader(rcfg(spec, tmp_path, index_dir=str(tmp_path / "index")), seed=3)    # from the files
    cat = resumed.planner.catalog
    rec = cat[resumed.planner.epoch(0).packs[0][0]]
    tar = srv.root / "same" / Path(rec.shard).name
    old = tar.read_bytes()
    tar.write_bytes(old[512:] + old[:512])              # the same size, every member a block earlier
    other = next(s for s in cat.shards if s != rec.shard)
    assert read_member(other, 0, 512, opts) == _member(shard_dir, Path(other).name, 0, 512)      # untouched: read
    failed = [f for f in next(resumed).failures if f["key"] == rec.key]
    when = r"20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC"
    assert len(failed) == 1 and re.search(
        rf"^{rec.shard} bytes={rec.video_offset}-\d+: the object was modified at {when}, its shard index was read at "
        rf"{when}: the shard was rewritten after its index was read", failed[0]["detail"]), failed
    fresh = load_catalog(spec, index_dir=tmp_path / "fresh", remote=opts)      # read after the write: no error
    assert len(read_member(fresh.shards[cat.shards.index(rec.shard)], rec.video_offset, rec.video_size,
                           opts)) == rec.video_size


def test_an_fsspec_shard_rewritten_longer_or_at_the_same_size_is_named(shard_dir):
    """Through fsspec a rewritten shard was seen only where a read came back short: one rewritten longer or at the
    same size was read at the old offsets (other bytes, no error). The first read of a shard in a process now asks
    its info() and compares its size with the index's and its tag (ETag, generation, modification time) with the
    one recorded when the index was read."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for p in Path(shard_dir).iterdir():
        fs.pipe_file(f"/keye-rw/d/{p.name}", p.read_bytes())
    try:
        cat = load_catalog("memory://keye-rw/d/*.tar")
        opts = RemoteOptions(timeout_s=2, retries=0)
        first = {}
        for i in range(len(cat)):
            if cat[i].video_size:
                first.setdefault(cat[i].shard, cat[i])
        (a, ra), (b, rb), (c, rc) = list(first.items())[:3]
        assert read_member(a, ra.video_offset, ra.video_size, opts) == \
            _member(shard_dir, Path(a).name, ra.video_offset, ra.video_size)          # unchanged: read
        whole = {s: fs.cat_file(urllib.parse.urlsplit(s).path) for s in (b, c)}
        fs.pipe_file(urllib.parse.urlsplit(b).path, b"\0" * 1024 + whole[b])
        with pytest.raises(RemoteError, match=rf"^{b} bytes={rb.video_offset}-\d+: the object has "
                                              rf"{len(whole[b]) + 1024} bytes, its shard index says {len(whole[b])}: "
                                              r"the shard was rewritten"):
            read_member(b, rb.video_offset, rb.video_size, opts)
        fs.pipe_file(urllib.parse.urlsplit(c).path, whole[c][512:] + whole[c][:512])
        with pytest.raises(RemoteError, match=rf"^{c} bytes=\d+-\d+: the object's created is .*, .* when its shard "
                                              r"index was read: the shard was rewritten"):
            read_member(c, rc.video_offset, rc.video_size, opts)
    finally:
        fs.rm("/keye-rw", recursive=True)


@pytest.mark.parametrize("fault", ["ignore_range", "403"])
def test_a_store_that_refuses_every_read_stops_the_run_and_the_launch(shard_dir, srv, tmp_path, fault):
    """A server that answers a Range request with the whole object (200: `python -m http.server` does), or a 403
    to every read (an expired presigned URL): no fault of one sample's. Each sample was quarantined and the run
    trained on packs of padding (loss 0.0000, checkpoints of those steps) until max_consecutive_failures; the run
    now stops naming the shard, and the launch's probe finds it before the model is built."""
    remote = VideoPackedLoader(rcfg(brace_spec(srv, shard_dir), tmp_path), seed=3)
    first = remote.planner.catalog[remote.planner.epoch(0).packs[0][0]]
    path = urllib.parse.urlsplit(first.shard).path
    srv.faults[path] = [fault]
    why = {"ignore_range": "HTTP 200 to a Range request", "403": "HTTP 403"}[fault]
    with pytest.raises(RuntimeError, match=rf"shard {first.shard} refuses reads \(.*{why}.*resume from the last"):
        next(remote)
    shards = resolve_shards(brace_spec(srv, shard_dir))
    srv.faults[urllib.parse.urlsplit(shards[0]).path] = [fault]
    with pytest.raises(ValueError, match=rf"shard {shards[0]}: .*{why}.*first 512 bytes"):
        probe_remote(shards, RemoteOptions(timeout_s=2, retries=0))
    probe_remote(shards, RemoteOptions(timeout_s=2, retries=0))     # the same server, answering as it should


def test_a_shard_deleted_during_the_run_stops_it_naming_the_url(shard_dir, srv, tmp_path):
    """A tar answering 404 after its index was read is the data gone, as a local shard file removed: the run stops
    (RuntimeError) instead of training on packs of padding."""
    remote = VideoPackedLoader(rcfg(brace_spec(srv, shard_dir), tmp_path), seed=3)
    first = remote.planner.catalog[remote.planner.epoch(0).packs[0][0]]
    srv.faults[urllib.parse.urlsplit(first.shard).path] = ["404"]
    with pytest.raises(RuntimeError, match=rf"shard {first.shard} is gone \(.*HTTP 404.*objects were moved or deleted"):
        next(remote)


def test_presigned_urls_from_a_list_file_never_reach_keys_records_logs_or_files(shard_dir, srv, tmp_path, caplog):
    """A list file of presigned URLs (query strings, userinfo; each tar's index on its own line's second URL): the
    requests carry them, nothing written does; a list signed anew gives the same catalog files and state."""
    import base64

    srv.require = (SECRET, "Basic " + base64.b64encode(AUTH[:-1].encode()).decode())

    def listing(sig: str) -> Path:
        f = tmp_path / f"list-{sig}.txt"
        f.write_text("".join(f"{srv.url.replace('//', '//' + AUTH)}/d/{n}?{sig} "
                             f"{srv.url.replace('//', '//' + AUTH)}/d/{n[:-4]}.idx.json?{sig}\n"
                             for n in tars(shard_dir)))
        return f
    caplog.set_level(logging.INFO)
    index_dir = tmp_path / "index"
    cfg = rcfg(str(listing(SECRET)), tmp_path, index_dir=str(index_dir), remote_retries=0)
    remote = VideoPackedLoader(cfg, seed=3)
    first = remote.planner.catalog[remote.planner.epoch(0).packs[0][0]]
    srv.faults[urllib.parse.urlsplit(first.shard).path] = ["503"]        # a failure record too
    got = take(remote, 2)
    assert srv.log and all(SECRET in p for p, _, _ in srv.log)
    seen = [json.dumps(remote.state_dict()), caplog.text, (tmp_path / "quarantine.jsonl").read_text(),
            " ".join(k for p in got for k in p.sample_keys), " ".join(remote.catalog.shards)]
    seen += [p.read_bytes().decode("latin-1") for p in index_dir.rglob("*") if p.is_file()]
    assert "read_error" in seen[2] and srv.url in seen[2]
    assert not [s for s in seen if "S3CR3T" in s or "pa55" in s]
    assert got[0].failures and got[1].num_docs
    # a redirect to another host takes the Range, not the password (urllib's own handler sent both)
    other = Server(srv.root)
    try:
        srv.require, srv.elsewhere = None, other.url
        srv.faults[urllib.parse.urlsplit(first.shard).path] = ["redirect"]
        data = read_member(RemoteShard(f"{srv.url.replace('//', '//' + AUTH)}/{first.shard.split('/', 3)[3]}"),
                           first.video_offset, first.video_size)
        assert len(data) == first.video_size and [r for _, r, _ in other.log] == [
            f"bytes={first.video_offset}-{first.video_offset + first.video_size - 1}"]
        assert srv.log[-1][2] is not None and other.log[-1][2] is None
    finally:
        other.httpd.shutdown()
        other.httpd.server_close()
    # signed anew (another query string): the same catalog directory, the state loads
    srv.require = ("sig=OTHER", "Basic " + base64.b64encode(AUTH[:-1].encode()).decode())
    before = sorted(p.name for p in index_dir.iterdir())
    again = VideoPackedLoader(rcfg(str(listing("sig=OTHER")), tmp_path, index_dir=str(index_dir)), seed=3)
    assert sorted(p.name for p in index_dir.iterdir()) == before
    again.load_state_dict(remote.state_dict())


def test_fsspec_urls_read_as_local_files_and_a_missing_package_is_named(shard_dir, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for p in Path(shard_dir).iterdir():
        fs.pipe_file(f"/keye-test/d/{p.name}", p.read_bytes())
    try:
        want = [signature(p) for p in take(VideoPackedLoader(rcfg(shard_dir, tmp_path), seed=3), 2)]
        remote = VideoPackedLoader(rcfg("memory://keye-test/d/*.tar", tmp_path), seed=3)
        assert [signature(p) for p in take(remote, 2)] == want
        assert remote.catalog.shards[0] == "memory:///keye-test/d/shard-000000.tar"   # fsspec's own name
    finally:
        fs.rm("/keye-test", recursive=True)
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"VideoDataConfig.shards: 's3://bucket/d/s.tar': fsspec cannot open "
                                             r"s3:// URLs here \(.*s3fs"):
            load_catalog("s3://bucket/d/s.tar")


def test_fsspec_reads_check_their_size_and_a_backend_error_costs_the_sample_alone(shard_dir, tmp_path, monkeypatch):
    """fsspec backends raise their own errors, not always OSError (gcsfs's HttpError, botocore's connection errors
    after s3fs's retries): one escaped the loader and stopped the run. Now it is retried, as a short answer is, and
    the pack is unchanged; an object cut shorter than its index says is quarantined naming both sizes."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for p in Path(shard_dir).iterdir():
        fs.pipe_file(f"/keye-fs/d/{p.name}", p.read_bytes())

    class BackendError(Exception):       # stands for a backend's own exception class
        pass
    faults: list = []
    real = type(fs).cat_file

    def flaky(self, path, start=None, end=None, **kw):
        fault = faults.pop(0) if faults else None
        if fault == "error":
            raise BackendError("Connection was closed before we received a valid response")
        data = real(self, path, start=start, end=end, **kw)
        return data[:len(data) // 2] if fault == "short" and start is not None else data
    monkeypatch.setattr(type(fs), "cat_file", flaky)
    try:
        want = [signature(p) for p in take(VideoPackedLoader(rcfg(shard_dir, tmp_path), seed=3), 2)]
        remote = VideoPackedLoader(rcfg("memory://keye-fs/d/*.tar", tmp_path), seed=3)
        faults[:] = ["error", "short"]
        assert [signature(p) for p in take(remote, 2)] == want and not faults
        assert remote.stats.get("samples_failed", 0) == 0
        # the tar cut in half after its index was read: its samples fail naming the sizes, the run goes on
        again = VideoPackedLoader(rcfg("memory://keye-fs/d/*.tar", tmp_path), seed=3)
        first = again.planner.catalog[again.planner.epoch(0).packs[0][0]]
        path = "/keye-fs/d/" + Path(first.shard).name
        whole = real(fs, path)
        fs.pipe_file(path, whole[:first.video_offset + 10])
        failed = [f for f in next(again).failures if f["key"] == first.key]
        assert len(failed) == 1 and (f"the object has {first.video_offset + 10} bytes, its shard index says "
                                     f"{len(whole)}") in failed[0]["detail"], failed
    finally:
        fs.rm("/keye-fs", recursive=True)


def test_a_failed_range_read_names_the_url_without_its_query(srv, shard_dir):
    srv.faults["/d/shard-000000.tar"] = ["503", "503"]
    got = []
    with pytest.raises(RemoteError, match=rf"^{srv.url}/d/shard-000000.tar bytes=0-99: HTTP 503 Service "
                                          r"Unavailable \(2 tries\)$"):
        http_read_range(f"{srv.url}/d/shard-000000.tar?{SECRET}", 0, 100, RemoteOptions(2, 1, 0), got.append)
    # a URL that a request cannot carry: http.client's error quoted its path and query (the signature), and was
    # retried; now named without them, at once
    with pytest.raises(RemoteError, match=r"^http://127.0.0.1:\d+/d/shard-000000.tar bytes=0-99: the URL holds "
                                          r"characters that a request cannot carry") as e:
        http_read_range(f"{srv.url}/d/shard-000000.tar?{SECRET}\x7f", 0, 100, RemoteOptions(2, 1, 0), got.append)
    assert "S3CR3T" not in str(e.value)
    # a server that trickles its bytes, each within the timeout: ends when its time is out (a request gets
    # remote_timeout_s a MiB), not after the 5 s that 100 bytes take
    srv.faults["/d/shard-000000.tar"] = ["trickle", "trickle"]
    t0 = time.perf_counter()
    with pytest.raises(RemoteError, match=r"bytes=0-99: too slow \(\d+ bytes in \d\.\d s; remote_timeout_s = 0.4 s a "
                                          r"MiB\) \(2 tries\)"):
        http_read_range(f"{srv.url}/d/shard-000000.tar", 0, 100, RemoteOptions(0.4, 1, 0), got.append)
    assert time.perf_counter() - t0 < 2.5
    got.clear()
    http_read_range(f"{srv.url}/d/shard-000000.tar", 512, 100, RemoteOptions(2, 0, 0), got.append)
    with open(Path(shard_dir) / "shard-000000.tar", "rb") as f:
        f.seek(512)
        assert b"".join(got) == f.read(100)


def test_a_throttled_read_waits_as_long_as_the_server_asks_within_the_timeout(srv, shard_dir):
    """A 429 or 503 with Retry-After (delay-seconds or an HTTP date) was tried again after the loader's own backoff
    (here 10 ms) whatever the server asked: a throttling front-end was hit again at once by every rank. Now the retry
    waits what it asks, and at most remote_timeout_s: a longer ask waits that, and the failure says so."""
    import email.utils

    url = f"{srv.url}/d/shard-000000.tar"
    want = _member(shard_dir, "shard-000000.tar", 0, 100)
    for fault, least in (("429 1", 1.0), ("503 {date}", 0.5)):
        date = email.utils.formatdate(time.time() + 1.5, usegmt=True)     # whole seconds: 0.5 to 1.5 s from now
        fault = fault.format(date=date)
        srv.faults["/d/shard-000000.tar"] = [fault]
        srv.stamps.clear()
        got: list = []
        http_read_range(url, 0, 100, RemoteOptions(timeout_s=5, retries=1, backoff_s=0.01), got.append)
        gap = srv.stamps[1] - srv.stamps[0]
        # at least the ask (the draw is 1x to 1.2x of it); under it by 1.5 s on a busy machine
        assert b"".join(got) == want and least - 0.05 <= gap < least * 1.2 + 1.5, (fault, gap)
    srv.faults["/d/shard-000000.tar"] = ["429 3600"] * 2
    srv.stamps.clear()
    with pytest.raises(RemoteError, match=r"bytes=0-99: HTTP 429 Too Many Requests \(the server asked for a wait of "
                                          r"3600 s, Retry-After; a retry waits at most remote_timeout_s = 0.5 s\) "
                                          r"\(2 tries\)$"):
        http_read_range(url, 0, 100, RemoteOptions(timeout_s=0.5, retries=1, backoff_s=0.01), [].append)
    assert 0.45 <= srv.stamps[1] - srv.stamps[0] < 0.5 + 1.5, srv.stamps     # the bound, not the ask


def _member(shard_dir, name: str, offset: int, size: int) -> bytes:
    with open(Path(shard_dir) / name, "rb") as f:
        f.seek(offset)
        return f.read(size)


def test_range_reads_keep_their_connection_and_a_server_that_closes_it_is_followed(srv, shard_dir):
    """50 member reads in a row opened 50 TCP connections (a TLS handshake each, on a store: the handshakes, not the
    bytes, set the rate, and a front-end limits new connections); now one is kept per host and thread. A server
    that does not keep it (HTTP/1.0, `Connection: close`), closes it when idle, or closes it the moment the next
    request comes, costs a new connection, never a failed read: remote_retries=0 here."""
    url = f"{srv.url}/d/shard-000000.tar"
    opts = RemoteOptions(timeout_s=2, retries=0)
    want = {k: _member(shard_dir, "shard-000000.tar", 100 * k, 300 + k) for k in range(50)}

    def reads(n: int) -> int:
        before = srv.connections
        for k in range(n):
            assert read_member(RemoteShard(url), 100 * k, 300 + k, opts) == want[k]
        return srv.connections - before
    assert reads(50) <= 1 and len(srv.log) == 50           # 1: the first read's (0 where an earlier test's is kept)
    for mode, opened in (("http10", 4), ("close", 5)):     # the first read of 5 on the kept one, then one each
        srv.mode = mode
        assert reads(5) == opened, mode                     # each answer ends its connection: read on a new one
    srv.mode, srv.idle_s = "", 0.2
    reads(1)
    time.sleep(0.5)                                         # the server closed the idle connection
    assert reads(2) == 1
    srv.idle_s = None
    reads(1)
    srv.faults["/d/shard-000000.tar"] = ["eof"]              # closed as the request came: sent again, on a new one
    n = len(srv.log)
    assert reads(1) == 1 and len(srv.log) == n + 2


def test_a_connection_past_descriptor_1023_is_kept_too(srv, shard_dir):
    """A trainer's process holds many descriptors (NCCL, mapped shards, logs): a connection on descriptor 1100 was
    judged closed by select() (which refuses descriptors past 1023) and replaced at every read."""
    import os
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200:
        pytest.skip("a descriptor limit under 1200")
    held = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        url = f"{srv.url}/d/shard-000002.tar"      # a host:port key of its own: no connection kept from before
        before = srv.connections
        for k in range(5):
            assert read_member(RemoteShard(url.replace("127.0.0.1", "localhost")), k, 100,
                               RemoteOptions(timeout_s=2, retries=0)) == _member(shard_dir, "shard-000002.tar", k, 100)
        assert srv.connections - before == 1
    finally:
        for fd in held:
            os.close(fd)


class _Tunnel:
    """An HTTPS proxy of the smallest kind: `CONNECT host:port`, answered 200, then the bytes copied both ways.
    `connects`: each CONNECT line with its Proxy-Authorization."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connects: list = []
        self.refuse = False        # answer 407 Proxy Authentication Required
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            got = conn.recv(4096)
            if not got:
                return conn.close()
            head += got
        lines = head.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
        auth = next((v.strip() for k, _, v in (h.partition(":") for h in lines[1:])
                     if k.lower() == "proxy-authorization"), None)
        self.connects.append((lines[0], auth))
        if self.refuse:
            conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            return conn.close()
        host, _, port = lines[0].split()[1].rpartition(":")
        up = socket.create_connection((host, int(port)))
        for x in (conn, up):            # as the server: no write held for the other side's ACK
            x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pump(a, b) -> None:
            try:
                while True:
                    buf = a.recv(65536)
                    if not buf:
                        break
                    b.sendall(buf)
            except OSError:
                pass
            for x in (a, b):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        threading.Thread(target=pump, args=(up, conn), daemon=True).start()
        pump(conn, up)

    def close(self) -> None:
        self.listener.close()


def test_https_reads_keep_their_connection(shard_dir, tmp_path, monkeypatch):
    """The same over TLS (a certificate made here by openssl, trusted through SSL_CERT_FILE): where a handshake cost
    most of a millisecond of CPU per read (bench/RESULTS.md), 20 reads open one connection, and one whose
    certificate is not trusted is refused (retried, then named) rather than read."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    root = tmp_path / "served"
    root.mkdir()
    (root / "d").symlink_to(shard_dir)
    tls = Server(root)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    tls.httpd.socket = ctx.wrap_socket(tls.httpd.socket, server_side=True)
    url = tls.url.replace("http://", "https://") + "/d/shard-000000.tar"
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        for k in range(20):
            assert read_member(RemoteShard(url), 50 * k, 700, RemoteOptions(timeout_s=2, retries=0)) == \
                _member(shard_dir, "shard-000000.tar", 50 * k, 700)
        assert tls.connections == 1 and len(tls.log) == 20
        # through an https_proxy (CONNECT): a tunnel with TLS to the store inside it, kept as a direct connection is;
        # the proxy's password goes to the proxy alone
        import base64

        from data.video import remote as remote_mod

        tunnel = _Tunnel()
        try:
            monkeypatch.setenv("https_proxy", tunnel.url.replace("//", "//puser:ppw@"))
            for name in ("HTTPS_PROXY", "no_proxy", "NO_PROXY"):
                monkeypatch.delenv(name, raising=False)
            for k in range(5):
                assert read_member(RemoteShard(url), 30 * k, 900, RemoteOptions(timeout_s=2, retries=0)) == \
                    _member(shard_dir, "shard-000000.tar", 30 * k, 900)
            host = urllib.parse.urlsplit(url).netloc
            assert [(line.rsplit(" ", 1)[0], auth) for line, auth in tunnel.connects] == [
                (f"CONNECT {host}", "Basic " + base64.b64encode(b"puser:ppw").decode())]      # one, for 5 reads
            assert tls.connections == 2 and len(tls.log) == 25 and all(a is None for _, _, a in tls.log[20:])
            # a proxy that refuses the tunnel (wrong credentials): each read was tried again (5 tries, 15 s at the
            # defaults) and each sample quarantined in turn; it is a refusal of every read, named at once
            tunnel.refuse = True
            remote_mod.close_idle()
            with pytest.raises(RemoteError, match=r"bytes=0-9: the https_proxy refuses the tunnel \(Tunnel connection "
                                                  r"failed: 407 Proxy Authentication Required\)") as e:
                read_member(RemoteShard(url), 0, 10, RemoteOptions(timeout_s=2, retries=2, backoff_s=0.01))
            assert e.value.refused and e.value.status == 407 and len(tunnel.connects) == 2
        finally:
            tunnel.close()
            monkeypatch.delenv("https_proxy")
        monkeypatch.delenv("SSL_CERT_FILE")          # not trusted now; another host name: a new connection
        monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "none"))
        with pytest.raises(RemoteError, match=r"https://localhost:\d+/d/shard-000000.tar bytes=0-9: connection failed "
                                              r"\(SSLCertVerificationError: .*certificate verify failed"):
            read_member(RemoteShard(url.replace("127.0.0.1", "localhost")), 0, 10,
                        RemoteOptions(timeout_s=2, retries=0))
    finally:
        tls.httpd.shutdown()
        tls.httpd.server_close()


def test_a_forked_worker_opens_its_own_connection(srv, shard_dir):
    """A DataLoader worker is forked from the process that read the catalog (its connections kept): a connection of
    the parent's, written to by both, would mix their requests and answers. The child opens its own; the parent's
    stays whole and in use."""
    import os

    url = f"{srv.url}/d/shard-000001.tar"
    opts = RemoteOptions(timeout_s=2, retries=0)
    want = _member(shard_dir, "shard-000001.tar", 0, 4096)
    assert read_member(RemoteShard(url), 0, 4096, opts) == want           # a connection kept in this process
    before = srv.connections
    pid = os.fork()
    if pid == 0:                                                            # the child: its answer is its exit code
        try:
            ok = read_member(RemoteShard(url), 0, 4096, opts) == want
        finally:
            os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert srv.connections == before + 1
    assert read_member(RemoteShard(url), 0, 4096, opts) == want and srv.connections == before + 1


def test_the_name_lookup_is_under_the_timeout(monkeypatch):
    """getaddrinfo has no timeout of its own: a resolver that does not answer held each request for its own tries
    (here 3 s), outside remote_timeout_s."""
    import socket as socket_mod

    def slow(*args, **kwargs):
        time.sleep(3)
        raise socket_mod.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket_mod, "getaddrinfo", slow)
    t0 = time.perf_counter()
    with pytest.raises(RemoteError, match=r"store.invalid/d/s.tar bytes=0-9: timed out \(1 tries\)"):
        read_member(RemoteShard("http://store.invalid/d/s.tar"), 0, 10, RemoteOptions(timeout_s=0.3, retries=0))
    assert time.perf_counter() - t0 < 1.5        # 0.3 s and the machine's slack, not the 3 s of the lookup


def test_an_http_proxy_from_the_environment_is_used(srv, shard_dir, monkeypatch):
    """http_proxy as urllib honoured it: the request goes to the proxy with the whole URL (the test server serves it
    as a proxy would); no_proxy names hosts that bypass it."""
    monkeypatch.setenv("http_proxy", srv.url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    want = _member(shard_dir, "shard-000000.tar", 10, 100)
    assert read_member(RemoteShard("http://store.invalid/d/shard-000000.tar"), 10, 100,
                       RemoteOptions(timeout_s=2, retries=0)) == want
    assert srv.log[-1][0] == "http://store.invalid/d/shard-000000.tar"
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert read_member(RemoteShard(f"{srv.url}/d/shard-000000.tar"), 10, 100,
                       RemoteOptions(timeout_s=2, retries=0)) == want
    assert srv.log[-1][0] == "/d/shard-000000.tar"


def test_image_samples_read_from_urls_decode_as_the_local_ones(srv, tmp_path):
    """An image sample's members are read in the DataLoader worker (timeout, retries) and decoded from a local copy
    in the guarded child: the pixels of the local shard's, and a failed read quarantined naming the URL."""
    import numpy as np
    from PIL import Image

    from data.video.images import inspect_image
    from data.video.shards import ShardWriter

    d = tmp_path / "img"
    d.mkdir()
    w = ShardWriter(d, 0)
    rng = np.random.default_rng(0)
    for i in range(3):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (56 + 28 * i, 84, 3), dtype=np.uint8)).save(p)
        w.add_image_sample(f"im{i}", [str(p)], {"schema": "keye-video-meta/4", "key": f"im{i}", "kind": "image",
                                                "source_path": p.name, "video": None, "images": [inspect_image(str(p))],
                                                "annotation": {"caption": f"picture {i}"}})
    w.close()
    (srv.root / "img").symlink_to(d)
    kw = dict(shuffle=False, num_epochs=1, max_image_tokens=16)
    want = [signature(p) for p in VideoPackedLoader(rcfg(d, tmp_path, **kw), seed=1)]
    got = [signature(p) for p in VideoPackedLoader(rcfg(f"{srv.url}/img/shard-000000.tar", tmp_path,
                                                        decode_isolation="process", **kw), seed=1)]
    assert got == want and sum(len(k) for _, _, k, _ in want) == 3
    srv.faults["/img/shard-000000.tar"] = ["503"] * 3
    packs = list(VideoPackedLoader(rcfg(f"{srv.url}/img/shard-000000.tar", tmp_path, **kw), seed=1))
    rec = read_jsonl(tmp_path / "quarantine.jsonl")
    assert len(rec) == 1 and rec[0]["reason"] == "read_error" and "HTTP 503" in rec[0]["detail"], rec
    assert f"{srv.url}/img/shard-000000.tar bytes=" in rec[0]["detail"]
    assert sum(p.num_docs for p in packs) == 2


def test_a_member_read_over_http_whose_bytes_changed_since_ingest_is_a_corrupt_member(srv, tmp_path):
    """The members' CRC32s (tests/data/test_bad_samples.py, there on local shards) are checked on the bytes a
    Range request brought, the video's as the image's: the two flipped samples are corrupt_member, naming the URL and
    the byte range, and the others train, as on the local copy."""
    from dataclasses import replace

    from .test_bad_samples import corrupted_copy

    d, flipped = corrupted_copy(tmp_path)
    (srv.root / f"corrupt_{tmp_path.name}").symlink_to(d)
    url = f"{srv.url}/corrupt_{tmp_path.name}/shard-000000.tar"
    cfg = rcfg(url, tmp_path, shuffle=False, num_epochs=1)
    got = {k.split("/")[1] for p in VideoPackedLoader(cfg, seed=0) for k in p.sample_keys}
    local = {k.split("/")[1] for p in VideoPackedLoader(replace(cfg, shards=str(d), quarantine_path=""), seed=0)
             for k in p.sample_keys}
    assert got == local and not set(flipped) & got
    q = {r["key"]: r for r in read_jsonl(cfg.quarantine_path)}
    assert set(q) == set(flipped) and all(r["reason"] == "corrupt_member" for r in q.values())
    for key, (off, size) in flipped.items():
        assert f"{url} bytes {off}-{off + size - 1}: CRC32 " in q[key]["detail"], q[key]
