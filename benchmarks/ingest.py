"""Ingest at scale: first ingest and unchanged re-ingest into a fresh file store, on 1 core and on 2.

Each measurement runs in a child process pinned to the first N cores (``sched_setaffinity``), so
ingest sees N usable cores, the way ``taskset`` would pin it. Peak RSS is the kernel's high-water
mark (``VmHWM``) of the ingest process and of each of its worker processes, sampled while it runs.

Last line: {"benchmark": "ingest", "images", "runs": [{"cores", "first_s", "reingest_s",
"peak_rss_mib", "worker_peak_rss_mib", "workers", ...}], "speedup_first_2_vs_1"}.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pneumonia_kfp.procs import descendants


def child(a) -> None:
    """One measurement, in this (pinned) process: first ingest, then an unchanged re-ingest."""
    import resource

    from pneumonia_kfp.ingest import ingest

    def cpu_seconds(who):  # this process, or its (finished) worker processes
        usage = resource.getrusage(who)
        return usage.ru_utime + usage.ru_stime

    with tempfile.TemporaryDirectory() as tmp:
        storage = a.storage or Path(tmp).as_uri()
        start, cpu = time.perf_counter(), [cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)]
        first = ingest(a.data, storage, image_size=a.image_size)
        first_s = time.perf_counter() - start
        main_cpu = cpu_seconds(resource.RUSAGE_SELF) - cpu[0]
        workers_cpu = cpu_seconds(resource.RUSAGE_CHILDREN) - cpu[1]
        start = time.perf_counter()
        again = ingest(a.data, storage, image_size=a.image_size)
        reingest_s = time.perf_counter() - start
    print(json.dumps({"images": sum(sum(c.values()) for c in first["counts"].values()),
                      "first_s": round(first_s, 2), "first_cpu_main_s": round(main_cpu, 2),
                      "first_cpu_workers_s": round(workers_cpu, 2),
                      "reingest_s": round(reingest_s, 3),
                      "uploaded_first": first["uploaded"], "uploaded_on_reingest": again["uploaded"],
                      "same_version": first["sha"] == again["sha"]}))


def _hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(a, cores: int) -> dict:
    """Run ``child`` pinned to ``cores`` cores, sampling the peak RSS of it and its workers."""
    pin = sorted(os.sched_getaffinity(0))[:cores]
    cmd = [sys.executable, __file__, "--child", "--data", a.data, "--image-size", str(a.image_size)]
    if a.storage:
        cmd += ["--storage", a.storage]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=lambda: os.sched_setaffinity(0, pin))
    peaks: dict[int, int] = {}

    def sample():
        while proc.poll() is None:
            for pid in {proc.pid} | descendants(proc.pid):
                kib = _hwm_kib(pid)
                if kib:
                    peaks[pid] = max(peaks.get(pid, 0), kib)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"ingest on {cores} core(s) failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    workers = [kib for pid, kib in peaks.items() if pid != proc.pid]
    return {"cores": len(pin), **result, "peak_rss_mib": round(peaks.get(proc.pid, 0) / 1024, 1),
            "worker_peak_rss_mib": round(max(workers, default=0) / 1024, 1), "workers": len(workers)}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help="ImageFolder (e.g. chest_xray, the Kermany layout)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--storage", help="store URI (default: a fresh temporary directory per run)")
    p.add_argument("--cores", default="1,2", help="core counts to measure, comma-separated (default: 1,2)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    load_before = os.getloadavg()[0]
    runs = [measure(a, int(n)) for n in a.cores.split(",")]
    # other work on the machine disturbs the 1-vs-2-core comparison: the 1-minute load says how much
    line = {"benchmark": "ingest", "images": runs[0]["images"], "image_size": a.image_size, "runs": runs,
            "load_avg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)]}
    by_cores = {r["cores"]: r for r in runs}
    if 1 in by_cores and 2 in by_cores:
        line["speedup_first_2_vs_1"] = round(by_cores[1]["first_s"] / by_cores[2]["first_s"], 2)
        # on a busy machine the wall-clock ratio is capped by the CPU share this session gets; the CPU
        # seconds say what idle cores would give: the main process's part runs once, the workers' part
        # spreads over the cores (Amdahl)
        two = by_cores[2]
        serial, parallel = two["first_cpu_main_s"], two["first_cpu_workers_s"]
        line["cpu_bound_speedup_2_vs_1"] = round((serial + parallel) / (serial + parallel / 2), 2)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
