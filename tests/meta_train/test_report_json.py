"""``results.json`` is written compactly (a list of numbers per line) and reads back bit for bit."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

from meta_train.reproduce import ReproduceConfig, report_json, write_report

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _bits(value: float) -> bytes:
    return struct.pack("<d", value)


CONFIG = ReproduceConfig(tasks=("mnist-nn-sigmoid-100",), optimizers=("adam",), runs=2, quick=True)


def _report() -> dict:
    curve = [2.302585092994046 / (k + 1) ** 0.5 for k in range(1000)] + [math.nan, 1e-300]
    cell = {
        "task": "mnist-nn-sigmoid-100",
        "optimizer": "adam",
        "runs": 2,
        "steps": len(curve),
        "seed": 0,
        "lr": 0.03125,
        "final_losses": [0.1 + 0.2, 1 / 3],
        "final_loss_mean": (0.1 + 0.2 + 1 / 3) / 2,
        "final_loss_std": 0.0,
        "diverged_runs": 0,
        "curve_mean": curve,
        "test_metrics": {},
    }
    return {
        "config": dataclasses.asdict(CONFIG),
        "created": "2026-12-06T00:00:00+00:00",
        "hardware": "x86_64, 2 CPUs",
        "optimizers": {"adam": "hand-designed (spec §5)"},
        "results": {"mnist-nn-sigmoid-100": {"adam": cell}},
        "sittings": [{"created": "a", "config": {"runs": 1}}, {"created": "b", "config": {}}],
    }


def test_every_number_reads_back_bit_for_bit_and_a_curve_is_one_line():
    report = _report()
    text = report_json(report)
    back = json.loads(text)
    curve = report["results"]["mnist-nn-sigmoid-100"]["adam"]["curve_mean"]
    back_curve = back["results"]["mnist-nn-sigmoid-100"]["adam"]["curve_mean"]
    assert [_bits(v) for v in back_curve] == [_bits(v) for v in curve]
    assert json.dumps(back, sort_keys=True) == json.dumps(report, sort_keys=True)
    # One line per key: the 1002-value curve is one line, not 1002 of them.
    assert text.count("\n") < 60
    curve_line = next(line for line in text.splitlines() if '"curve_mean"' in line)
    assert curve_line.strip().startswith('"curve_mean": [2.302585092994046,')
    assert curve_line.endswith("1e-300],")


def test_write_report_writes_the_compact_form(tmp_path):
    report = _report()
    write_report(report, CONFIG, tmp_path)
    text = (tmp_path / "results.json").read_text()
    assert text == report_json(report)
    assert json.dumps(json.loads(text), sort_keys=True) == json.dumps(report, sort_keys=True)


def test_the_committed_results_json_is_in_the_compact_form():
    text = (DOCS / "results.json").read_text()
    assert text == report_json(json.loads(text))
    assert len(text.encode()) < 5_000_000  # it was 5.8 MB with one float per line
