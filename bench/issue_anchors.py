"""Place our held-out figures on the issue's set of women, using the issue's own measurements as anchors.

    .venv/bin/python bench/issue_anchors.py --out bench/results/builtins/issue_anchors.json

Why: issue #15 measured three spaces on 61 MIAS women outside ``../shared`` (the built-in of the day, v1,
the 64-bin histogram and raw 32x32 pixels). Our one-run table (``bench/eval_builtins.py``'s
``evaluation.json``) measured the same three, and v2 and v3, on our 29 held-out women. A space's figure on
the issue's set minus its figure on ours says how much easier (or harder) the issue's set is for that
space; added to v3's, each anchor gives one estimate of what the filer's check will find. It is
arithmetic on measured figures, not a measurement: it assumes the sets differ for v3 as they do for the
anchor, and the issue's own pipeline may differ in details (its raw-pixel contralateral figure, 0.500,
is far above ours, 0.034, and near ``bench/gallery_size.py``'s left-mirrored pixels). The issue's
histogram figures fit the rule that counts a woman's own other image as a tissue hit
(``bench/gallery_size.py``), so each tissue shift is taken in that rule, then added to v3's figure under
both rules (counted, and excluded as ``mretrieve evaluate`` reports it).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ISSUE = {"built-in v1": {"contralateral@5": 0.484, "tissue P@10": 0.560},
         "64-bin histogram": {"contralateral@5": 0.615, "tissue P@10": 0.477},
         "raw pixels 32x32": {"contralateral@5": 0.500, "tissue P@10": 0.452}}  # issue #15, 61 women
SPACES = {"built-in v1": "built-in v1 (`mammo-simclr`)", "built-in v2": "built-in v2 (`mammo-simclr-v2`)",
          "built-in v3": "built-in v3 (`mammo-simclr-v3`, default)", "64-bin histogram": "histogram_64",
          "raw pixels 32x32": "raw_pixels_32x32"}  # our name -> evaluation.json's ``names`` value
RULES = {"same woman excluded": "precision@10", "same woman counted": "precision@10, same patient counted"}


def ours(evaluation: dict) -> dict[str, dict[str, float]]:
    """Our held-out figures per space (contralateral@5 and tissue P@10 under both rules)."""
    found = {}
    for name, shown in SPACES.items():
        space = evaluation["spaces"][next(k for k, v in evaluation["names"].items() if v == shown)]
        tissue = space["labels"]["tissue"]["retrieval"]
        found[name] = {"contralateral@5": space["contralateral"]["contralateral@5"],
                       **{f"tissue P@10, {rule}": tissue[field] for rule, field in RULES.items()}}
    return found


ISSUE_RULE = "tissue P@10, same woman counted"  # the rule the issue's figures fit (bench/gallery_size.py)


def estimates(held: dict[str, dict[str, float]], target: str) -> dict[str, dict[str, float]]:
    """``target``'s figures on the issue's set, by each anchor: ours + (issue's - ours) for the anchor.

    The tissue shift is measured in the issue's own rule (same woman counted), so that it holds the set's
    difficulty alone, then added to ``target``'s figure under each rule."""
    out = {}
    for anchor, figures in ISSUE.items():
        if anchor != "raw pixels 32x32":  # the issue's raw pixels find the other breast: not our space there
            shift = figures["contralateral@5"] - held[anchor]["contralateral@5"]
            out[f"contralateral@5, anchor {anchor}"] = {
                "shift": round(shift, 3), "estimate": round(held[target]["contralateral@5"] + shift, 3)}
        shift = figures["tissue P@10"] - held[anchor][ISSUE_RULE]
        for rule in RULES:
            metric = f"tissue P@10, {rule}"
            out[f"{metric}, anchor {anchor}"] = {"shift": round(shift, 3),
                                                 "estimate": round(held[target][metric] + shift, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evaluation", type=Path, default=HERE / "results" / "builtins" / "evaluation.json")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    held = ours(json.loads(args.evaluation.read_text()))
    report = {"issue_61_women": ISSUE, "our_29_heldout_women": held,
              "on the issue's set, estimated": {t: estimates(held, t) for t in ("built-in v2", "built-in v3")}}
    for target, rows in report["on the issue's set, estimated"].items():
        print(target)
        for anchor, row in rows.items():
            print(f"  {anchor:60s} shift {row['shift']:+.3f}  estimate {row['estimate']:.3f}")
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
