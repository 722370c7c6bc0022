"""A bounded load test of `pneumonia-kfp serve`, on 127.0.0.1 only: the real server in a subprocess,
N requests (default 2,000), C at a time (default 8), each one encoded image as an Open Inference
Protocol v2 BYTES input (or a KServe v1 instance). Nothing may be lost: every request must answer
200 with the probability the same image got when the server was idle; the exit status is 1 otherwise.

    .venv/bin/python benchmarks/serve_load.py --model out/models/resnet18

Last line: {"requests", "concurrency", "ok", "lost", "p50_ms", "p99_ms", "requests_per_s", ...}.
"""
import argparse
import base64
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"
NAME = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def request_of(protocol: str, image: bytes) -> tuple[str, bytes]:
    text = base64.b64encode(image).decode()
    if protocol == "v1":
        return f"/v1/models/{NAME}:predict", json.dumps({"instances": [{"b64": text}]}).encode()
    doc = {"inputs": [{"name": "image_files", "datatype": "BYTES", "shape": [1], "data": [text]}]}
    return f"/v2/models/{NAME}/infer", json.dumps(doc).encode()


def probability_of(protocol: str, doc: dict) -> float:
    if protocol == "v1":
        return doc["predictions"][0]["probability"]
    return next(o for o in doc["outputs"] if o["name"] == "probability")["data"][0]


class Client:
    """One keep-alive connection per thread, as a load balancer's pool would hold."""

    def __init__(self, port: int):
        self.port, self.local = port, threading.local()

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        for attempt in (0, 1):
            conn = getattr(self.local, "conn", None) or http.client.HTTPConnection(HOST, self.port, timeout=60)
            self.local.conn = conn
            try:
                conn.request("POST", path, body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                return r.status, r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                self.local.conn = None  # the server closed an idle keep-alive connection: reconnect once
                if attempt:
                    raise
        raise AssertionError("unreachable")


def wait_ready(proc, port: int, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            conn.request("GET", "/v2/health/ready")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"serve not ready in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def images_of(folder: str | None, tmp: Path) -> list[bytes]:
    if folder is None:
        from pneumonia_kfp.synthetic import make_synthetic

        folder = make_synthetic(tmp / "images", {"test": 8}, size=512)
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))
    return [p.read_bytes() for p in files if p.suffix.lower() in (".jpeg", ".jpg", ".png")]


def load(client: Client, protocol: str, images: list[bytes], expected: list[float], n: int, concurrency: int):
    def one(k: int):
        i = k % len(images)
        path, body = request_of(protocol, images[i])
        start = time.perf_counter()
        try:
            status, raw = client.post(path, body)
        except OSError as e:
            return None, f"request {k}: {type(e).__name__}: {e}"
        took = time.perf_counter() - start
        if status != 200:
            return None, f"request {k}: HTTP {status}: {raw[:200]!r}"
        p = probability_of(protocol, json.loads(raw))
        if abs(p - expected[i]) > 1e-5:
            return None, f"request {k}: probability {p} under load, {expected[i]} idle"
        return took, None

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    return results, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a model directory (OUT/models/<backbone> of run-local)")
    ap.add_argument("--images", help="a folder of image files to send (default: 16 synthetic 512 px JPEGs)")
    ap.add_argument("--requests", type=int, default=2000, help="how many (default: 2000)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default: 8)")
    ap.add_argument("--protocol", choices=("v2", "v1"), default="v2", help="Open Inference Protocol v2 "
                    "(default) or KServe v1")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = images_of(args.images, tmp)
        if not images:
            sys.exit(f"--images {args.images}: no .jpeg, .jpg or .png files there")
        port, log = free_port(), tmp / "serve.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen([str(Path(sys.executable).with_name("pneumonia-kfp")), "serve", "--model",
                                     args.model, "--port", str(port), "--name", NAME], stdout=f,
                                    stderr=subprocess.STDOUT)
        try:
            wait_ready(proc, port, log)
            client = Client(port)
            expected = []
            for image in images:  # idle answers; also the warm-up
                status, raw = client.post(*request_of(args.protocol, image))
                if status != 200:
                    sys.exit(f"an idle request failed: HTTP {status}: {raw[:300]!r}")
                expected.append(probability_of(args.protocol, json.loads(raw)))
            results, wall = load(client, args.protocol, images, expected, args.requests, args.concurrency)
            alive = proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    times = np.array([t for t, _ in results if t is not None]) * 1000
    problems = [p for _, p in results if p]
    for p in problems[:10]:
        print(p, file=sys.stderr)
    print(json.dumps({"requests": args.requests, "concurrency": args.concurrency, "protocol": args.protocol,
                      "images_per_request": 1, "ok": len(times), "lost": len(problems), "server_alive": alive,
                      "p50_ms": round(float(np.percentile(times, 50)), 1) if len(times) else None,
                      "p99_ms": round(float(np.percentile(times, 99)), 1) if len(times) else None,
                      "requests_per_s": round(len(times) / wall, 1), "wall_s": round(wall, 1)}))
    return 0 if not problems and alive else 1


if __name__ == "__main__":
    raise SystemExit(main())
