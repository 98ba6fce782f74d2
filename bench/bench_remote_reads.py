"""Range reads of a shard on object storage against a local HTTP/1.1 server (keep-alive): reads/s and the TCP
connections the server saw, for N member reads from one process by `threads` threads (a loader worker reads with
one; the catalog's index readers are 16).

    python bench/bench_remote_reads.py --reads 2000 --size 65536 --threads 1 [--tls]

--tls: HTTPS with a self-signed certificate made by `openssl` (trusted through SSL_CERT_FILE). Prints a table and
writes JSON (--out). The server runs in this process (threads), so its CPU is counted too: the numbers compare
request paths, not a store.
"""
from __future__ import annotations

import argparse
import http.server
import json
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.video.remote import RemoteOptions, RemoteShard  # noqa: E402
from data.video.shards import read_member  # noqa: E402


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True     # headers and body are two writes: Nagle held the body for the client's ACK

    def setup(self):
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def do_GET(self):
        a, b = (int(x) for x in self.headers["Range"].split("=", 1)[1].split("-"))
        body = self.server.data[a:b + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {a}-{b}/{len(self.server.data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64 << 10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "bench_remote_reads.json"))
    args = ap.parse_args()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.data = os.urandom(args.size * 16)
    httpd.lock, httpd.connections = threading.Lock(), 0
    if args.tls:
        d = tempfile.mkdtemp()
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        os.environ["SSL_CERT_FILE"] = cert          # the client's default context trusts it
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    sch = "https" if args.tls else "http"
    shard = RemoteShard(f"{sch}://127.0.0.1:{httpd.server_address[1]}/s.tar")
    opts = RemoteOptions(timeout_s=10, retries=0)

    def one(i: int) -> None:
        off = (i % 15) * args.size
        assert read_member(shard, off, args.size, opts) == httpd.data[off:off + args.size]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(one, range(args.reads)))
    took = time.perf_counter() - t0
    row = {"tls": args.tls, "reads": args.reads, "size": args.size, "threads": args.threads, "seconds": round(took, 3),
           "reads_per_s": round(args.reads / took, 1), "connections": httpd.connections}
    httpd.shutdown()
    print(f"{'tls':>5} {'reads':>6} {'bytes':>8} {'threads':>7} {'s':>7} {'reads/s':>8} {'connections':>11}")
    print(f"{str(args.tls):>5} {row['reads']:>6} {row['size']:>8} {row['threads']:>7} {row['seconds']:>7} "
          f"{row['reads_per_s']:>8} {row['connections']:>11}")
    with open(args.out, "w") as f:
        json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
