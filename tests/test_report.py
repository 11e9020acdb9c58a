"""README's results section is the output of benchmarks/report.py over benchmarks/results/."""

from __future__ import annotations

import json
from pathlib import Path

from tests.benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_readme_results_are_generated_from_the_result_files():
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- results:begin -->\n", "\n<!-- results:end -->"
    section = readme[readme.index(begin) + len(begin):readme.index(end)]
    assert section == load_benchmark("report").report()


def test_report_carries_every_seed_metric_for_both_adapter_sets():
    rows = load_benchmark("report").seed_rows()
    assert len(rows) == 2 + 2 * 3
    assert all(row.count("|") == 7 for row in rows)


def test_the_modes_table_has_every_mode_run_of_both_sets_at_one_commit_and_gpu():
    report = load_benchmark("report")
    rows = report.mode_rows()
    assert len(rows) == 2 + 2 * len(report.MODE_METRICS)
    assert {"overlap off", "overlap on", "all-resident"} <= set(rows[0].strip("| ").split(" | "))
    assert all(row.count("|") == rows[0].count("|") for row in rows)
    assert len({report.commit(name) for name in report.MODE_RUNS}) == 1
    assert len({report.load(name)["gpu"] for name in report.MODE_RUNS}) == 1


def test_a_mode_one_set_did_not_run_shows_a_dash_in_its_rows(monkeypatch):
    report = load_benchmark("report")
    summary = {key: {stat: 1.0 for stat in ("median", "p99", "mean")} for key in ("ttft_ms", "tpot_ms", "e2e_ms")}
    monkeypatch.setattr(report, "mode_runs", lambda: {"large": {"off": summary, "resident": summary},
                                                      "small": {"off": summary}})
    rows = report.mode_rows()
    assert rows[0] == "| adapters | metric (ms) | overlap off | all-resident |"
    assert rows[2].startswith("| large |") and rows[2].endswith("| 1.0 | 1.0 |")
    small = [row for row in rows if row.startswith("| small |")]
    assert len(small) == len(report.MODE_METRICS) and all(row.endswith(" | - |") for row in small)


def test_every_result_file_records_how_it_was_made():
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        if path.name.endswith(".trace.json"):  # a run's trace, not committed (.gitignore)
            continue
        record = json.loads(path.read_text())
        assert record["command"].startswith(("python -m benchmarks.", "python3 -m pytest", "LORASERVE_COMMIT=")), path
        assert {"benchmark", "commit", "gpu", "date"} <= record.keys(), path
        assert path.stat().st_size < 64_000, f"{path.name}: keep result files small"


def test_the_mixed_step_line_compares_runs_of_one_commit_and_gpu():
    report = load_benchmark("report")
    runs = [report.load(name) for name in report.STEP_TIMES.values()]
    assert {(run["commit"], run["gpu"]) for run in runs} == {(runs[0]["commit"], runs[0]["gpu"])}
    assert [run["lora_fold"] for run in runs] == [False, True]
    assert "folded into the base GEMMs (+6.3%" in report.mixed_step()
