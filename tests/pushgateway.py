"""A real Prometheus pushgateway (Debian's prometheus-pushgateway) on 127.0.0.1, for metric tests."""
import shutil
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

PUSHGATEWAY = shutil.which("prometheus-pushgateway") or "/usr/bin/prometheus-pushgateway"


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory):
    """``host:port`` of a pushgateway running for this test module (in memory: Debian's binary
    persists to /var/lib/prometheus by default)."""
    from tests.conftest import free_port  # here: conftest imports this module first

    port = free_port()
    log = tmp_path_factory.mktemp("pushgateway") / "pushgateway.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pushgateway did not start: {log.read_text()}") from None
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def scrape(gateway: str) -> dict:
    """The pushgateway's /metrics as {(sample name, frozenset(labels)): value}, our prefix only."""
    with urllib.request.urlopen(f"http://{gateway}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("pneumonia_kfp_"):
                out[s.name, frozenset(s.labels.items())] = s.value
    return out


def delete_group(gateway: str, path: str) -> None:
    """DELETE /metrics/<path> (e.g. job/pneumonia_kfp_train/backbone/resnet18)."""
    req = urllib.request.Request(f"http://{gateway}/metrics/{path}", method="DELETE")
    urllib.request.urlopen(req, timeout=5).close()
