"""The built-in encoders' table (README, "The built-in encoders"), from one run of `mretrieve evaluate`.

    .venv/bin/python bench/eval_builtins.py --mias ../shared/data/mias --out bench/results/builtins

One catalog gets a model version each for: built-ins v1, v2 and v3, a tissue adapter on each, the same
ResNet-18 with seeded random weights (an `ingest`, then `reindex`es). The adapters
are trained (`mretrieve adapt`) on the labels of the women the built-ins trained on, never on the
held-out women. Then `mretrieve evaluate --all-versions --heldout-from <v3 weights>` measures every
version and the two classical references (raw pixels, 64-bin histogram) on the held-out women's images,
in one run. Everything runs through the installed CLI, as a user would.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
MRETRIEVE = str(Path(sys.executable).with_name("mretrieve"))


def run(home: Path, config: Path | None, *args: str) -> str:
    env = {**os.environ, "MRETRIEVE_HOME": str(home)}
    env.pop("MRETRIEVE_CONFIG", None)
    command = [MRETRIEVE, *(["--config", str(config)] if config else []), *args]
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    print(f"$ mretrieve {' '.join(command[1:])}  ({time.time() - started:.0f} s, exit {done.returncode})", flush=True)
    if done.returncode:
        raise SystemExit(done.stderr)
    return done.stdout


def main() -> None:
    from mammo_retrieval.analysis.evaluate import heldout_patients
    from mammo_retrieval.encoders.model import packaged_weights
    from mammo_retrieval.encoders.registry import BUILTIN, BUILTIN_V1, BUILTIN_V2, DEFAULT_REGISTRY
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mias", type=Path, default=ROOT.parent / "shared" / "data" / "mias")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/eval-builtins"))
    args = parser.parse_args()
    home, configs = args.work / "home", args.work / "configs"
    if home.exists():
        raise SystemExit(f"{home} exists: remove it or choose another --work")
    configs.mkdir(parents=True, exist_ok=True)
    v3_weights = packaged_weights(DEFAULT_REGISTRY.get(BUILTIN).weights_file)
    v2_weights = packaged_weights(DEFAULT_REGISTRY.get(BUILTIN_V2).weights_file)
    held = heldout_patients(str(v3_weights))  # v1's held-out women, recorded in every built-in's weights
    labels = pd.read_csv(args.mias / "labels.csv")
    trained_on = args.work / "labels-training-women.csv"
    labels[~labels.PatientID.isin(held)].to_csv(trained_on, index=False)

    def config(name: str, text: str) -> Path:
        path = configs / f"{name}.yaml"
        path.write_text(text)
        return path

    v1_weights = packaged_weights(DEFAULT_REGISTRY.get(BUILTIN_V1).weights_file)
    # configs that pin their weights serve that model whatever is live (README, "reindex")
    v1 = config("v1", f"encoder:\n  name: {BUILTIN_V1}\n  weights: {v1_weights}\n")
    v2 = config("v2", f"encoder:\n  name: {BUILTIN_V2}\n  weights: {v2_weights}\n")
    v3 = config("v3", f"encoder:\n  name: {BUILTIN}\n  weights: {v3_weights}\n")
    run(home, v1, "ingest", str(args.mias), "--no-progress")
    import timm
    import torch
    torch.manual_seed(0)
    random = args.work / "resnet18-seeded-random.pt"
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), random)
    run(home, None, "reindex", "--model", str(random), "--no-progress")     # v1's network and input, random weights
    run(home, None, "reindex", "--encoder", BUILTIN_V2, "--no-progress")    # v2
    run(home, None, "reindex", "--encoder", BUILTIN, "--no-progress")       # v3
    adapters = {}
    for name, cfg in (("v1", v1), ("v2", v2), ("v3", v3)):
        adapter = args.work / f"{name}-tissue-adapter.safetensors"
        # seed 1: the adapter's own held-out split must not coincide with the built-ins' (seed 0, 30%)
        print(run(home, cfg, "adapt", "--labels", str(trained_on), "--label-column", "tissue", "--out", str(adapter),
                  "--seed", "1"))
        run(home, cfg, "reindex", "--model", str(adapter), "--no-progress")
        adapters[name] = adapter
    args.out.mkdir(parents=True, exist_ok=True)
    print(run(home, v3, "evaluate", "--labels", str(args.mias / "labels.csv"), "--label-column", "tissue",
              "--label-column", "abnormality", "--all-versions", "--heldout-from", str(v3_weights),
              "--out", str(args.out), "--no-progress"))
    from mammo_retrieval.core.fileio import sha256_file
    names = {sha256_file(v1_weights)[:12]: "built-in v1 (`mammo-simclr`)",
             sha256_file(v2_weights)[:12]: "built-in v2 (`mammo-simclr-v2`)",
             sha256_file(v3_weights)[:12]: "built-in v3 (`mammo-simclr-v3`, default)",
             sha256_file(random)[:12]: "ResNet-18, seeded random weights (v1's input)",
             sha256_file(adapters["v1"])[:12]: "built-in v1 + tissue adapter",
             sha256_file(adapters["v2"])[:12]: "built-in v2 + tissue adapter",
             sha256_file(adapters["v3"])[:12]: "built-in v3 + tissue adapter"}
    report = json.loads((args.out / "evaluation.json").read_text())
    report["command"] = "bench/eval_builtins.py"
    report["names"] = {space: next((n for sha, n in names.items() if sha in space), space) for space in report["spaces"]}
    (args.out / "evaluation.json").write_text(json.dumps(report, indent=2))
    rows = ["| space | contralateral@5 | contralateral@10 | tissue P@10 | tissue mAP | abnormality P@10 | "
            "tissue balanced acc. (SVM) | tissue P@10, same woman counted |", "|---|---|---|---|---|---|---|---|"]
    for space, m in report["spaces"].items():
        t, a = m["labels"]["tissue"], m["labels"]["abnormality"]
        rows.append(f"| {report['names'][space]} | {m['contralateral']['contralateral@5']:.3f} | "
                    f"{m['contralateral']['contralateral@10']:.3f} | {t['retrieval']['precision@10']:.3f} | "
                    f"{t['retrieval']['mAP']:.3f} | {a['retrieval']['precision@10']:.3f} | "
                    f"{t['classifiers']['svm']['balanced_accuracy']:.3f} | "
                    f"{t['retrieval']['precision@10, same patient counted']:.3f} |")
    (args.out / "table.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
