"""Study-level fusion rules compared on labelled studies (issue #13).

    .venv/bin/python bench/eval_study_fusion.py --out bench/results/study_fusion.json

Ingests the 200 mini-MIAS images (100 studies: left and right MLO of one woman) with the built-in encoder,
then queries every study by its AccessionNumber under each rule and scores the hits against the study's
labels: the same breast tissue class (F/G/D, one per woman), and the same normal/abnormal status (a study
is abnormal when one of its images has a finding). Precision@k is the mean share of the k hit studies
that agree; the chance level is printed beside it. Caveat: the built-in encoder was trained on these
very women (v2 with the tissue labels of 58 of them), which inflates tissue precision and favours neither
rule; `mretrieve evaluate --level study --heldout-from` measures the women it never saw.
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import emit  # noqa: E402
MIAS = REPO.parent / "shared" / "data" / "mias"


def study_labels(ws) -> dict[str, dict]:
    """Study key (as the catalog keys it: AccessionNumber, else StudyInstanceUID) -> its labels."""
    with open(MIAS / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    studies: dict[str, dict] = {}
    for r in rows:
        key = ws.search.record(r["SOPInstanceUID"]).study_key
        s = studies.setdefault(key, {"tissue": r["tissue"], "abnormal": False})
        s["abnormal"] |= r["abnormality"] != "NORM"
    return studies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--k", default="1,5,10")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from mammo_retrieval.app.workspace import Workspace
    from mammo_retrieval.core.config import load_config
    from mammo_retrieval.search.study import RULES
    home = args.home or Path(tempfile.mkdtemp(prefix="eval-study-"))
    ws = Workspace(load_config(env={"MRETRIEVE_HOME": str(home)}))
    report = ws.ingest(MIAS, workers=1)
    labels = study_labels(ws)
    ks = [int(k) for k in args.k.split(",")]
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "studies": len(labels),
              "images": report.ingested + report.already_present, "model": ws.encoder.identity.key, "rules": {}}
    for name in ("tissue", "abnormal"):
        counts = Counter(s[name] for s in labels.values())
        n = len(labels)
        # chance: the share of *other* studies with the query's label, averaged over queries
        result[f"chance_{name}"] = round(sum(c * (c - 1) for c in counts.values()) / (n * (n - 1)), 4)
    for rule in RULES:
        agree = {f"{name}@{k}": [] for name in ("tissue", "abnormal") for k in ks}
        for key, label in labels.items():
            hits = ws.search.similar_studies(key, max(ks), rule=rule).hits
            for k in ks:
                top = [labels[h.study_key] for h in hits[:k]]
                for name in ("tissue", "abnormal"):
                    agree[f"{name}@{k}"].append(sum(t[name] == label[name] for t in top) / k)
        result["rules"][rule] = {m: round(sum(v) / len(v), 4) for m, v in agree.items()}
        print(rule, result["rules"][rule], flush=True)
    ws.close()
    emit(result, args.out)


if __name__ == "__main__":
    main()
