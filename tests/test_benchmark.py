"""scripts/benchmark.py on a tiny configuration: every comparison is measured and reported (the
fields, not the speed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

COMPARISONS = {
    *("features", "extraction", "top_epoch", "predict", "predict_naive", "epoch", "prepare"),
    *("classes_prepare", "classes_extraction", "classes_predict"),
    "audit",
    *("variant_int8", "predict_auto"),
    "faithfulness",  # probability drops, not seconds
}  # and trial, refit_trial, head_trial: 5 real dvc runs, left out here (--skip-trials) for CI's time
WHERE_BF16 = {"variant_bf16"}  # only on a CPU with bf16 units


@pytest.mark.slow  # real processes: run by make test, not make check
def test_benchmark_measures_every_comparison_and_writes_json(make_dataset, tmp_path):
    dataset = make_dataset(n_per_class=15)  # 30 images: 3 per class of the 10-class comparison
    out = tmp_path / "benchmark.json"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "benchmark.py"),
            "--source",
            str(dataset.zip),
            "--images",
            "30",
            "--arch",
            "simple_cnn",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--skip-trials",
            "--audit-images",
            "24",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    results = {r["benchmark"]: r for r in report["results"]}
    faithfulness = results.pop("faithfulness")
    assert faithfulness["count"] > 0 and faithfulness["target"] == 1.0
    assert -1 <= faithfulness["project_drop"] <= 1 and -1 <= faithfulness["baseline_drop"] <= 1
    assert COMPARISONS - {"faithfulness"} <= set(results) <= COMPARISONS | WHERE_BF16
    assert results["predict_auto"]["target"] == 1.6 and results["predict_auto"]["peak_rss_mb"] > 0
    assert results["audit"]["count"] == 24 and results["prepare"]["count"] == 30  # --audit-images: its own set
    for r in results.values():
        assert r["project_s"] > 0 and r["baseline_s"] > 0 and r["count"] > 0
        assert r["ratio"] > 0 and r["project_per_s"] > 0 and r["baseline_per_s"] > 0
    assert results["predict"]["count"] == 30 and results["predict"]["target"] == 0.8
    assert results["extraction"]["target"] == 0.8
    for what in ("prepare", "extraction", "predict"):  # 10 classes vs 2, same images
        assert results[f"classes_{what}"]["target"] == 0.9
    assert results["classes_predict"]["count"] == 30
    assert results["audit"]["flipped"] == 1  # 4% of every image of --audit-images
    assert 0 <= results["audit"]["recall"] <= 1 and 0 <= results["audit"]["precision"] <= 1
    assert results["predict"]["peak_rss_mb"] > 0 and report["peak_rss_mb"] > 0
    assert report["machine"]["usable_cores"] >= 1 and report["date"]
    assert "ratio" in run.stdout and "peak RSS" in run.stdout  # the printed table

    table = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), "--markdown", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert {row.split(":")[0].removeprefix("| ") for row in rows} == {*results, "faithfulness"}, table.stdout
    assert report["date"][:10] in table.stdout and report["machine"]["cpu"] in table.stdout
