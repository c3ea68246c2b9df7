"""evaluate --out on an archive where no woman has both breasts (e.g. the 8 CBIS-DDSM files alone): the
contralateral hit rate is None, and the Markdown table must say n/a instead of crashing (the wheel check
found this)."""
from mammo_retrieval.analysis.evaluate import to_markdown


def test_markdown_writes_na_for_a_metric_with_nothing_to_measure():
    report = {
        "k": [1, 3], "images": 8, "patients": 8, "joined_on": "SOPInstanceUID", "random_weights": False,
        "label_columns": ["laterality"],
        "spaces": {"embedding": {
            "contralateral": {"contralateral@1": None, "contralateral@3": None},
            "labels": {"laterality": {"retrieval": {"precision@1": 0.5, "precision@3": 0.25, "mAP": 0.4},
                                      "classifiers": {"skipped": "too few patients"}}},
        }},
    }
    row = next(line for line in to_markdown(report).splitlines() if line.startswith("| embedding | n/a"))
    assert row == "| embedding | n/a | n/a | 0.500 | 0.250 | 0.400 |"


def test_markdown_gives_the_same_patient_counted_precision_when_the_report_has_it():
    report = {
        "k": [1], "images": 8, "patients": 4, "joined_on": "SOPInstanceUID", "random_weights": False,
        "label_columns": ["tissue"],
        "spaces": {"embedding": {
            "contralateral": {"contralateral@1": 0.5},
            "labels": {"tissue": {"retrieval": {"precision@1": 0.25, "mAP": 0.4,
                                                "precision@1, same patient counted": 0.75},
                                  "classifiers": {"skipped": "too few patients"}}},
        }},
    }
    lines = to_markdown(report).splitlines()
    assert "| embedding | 0.500 | 0.250 | 0.400 |" in lines
    counted = lines.index("| space | tissue P@1 |")
    assert "own other images counted" in lines[counted - 2] and lines[counted + 2] == "| embedding | 0.750 |"
    del report["spaces"]["embedding"]["labels"]["tissue"]["retrieval"]["precision@1, same patient counted"]
    assert "own other images counted" not in to_markdown(report)  # a report from before the metric
