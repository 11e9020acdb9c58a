"""The benchmark client's workload generation and statistics (no server needed)."""

from __future__ import annotations

import argparse
import math
import random
from collections import Counter

import pytest

from loraserve.cli import main as cli

from loraserve.bench import (
    Record,
    add_bench_parser,
    arrival_times,
    build_workload,
    format_comparison,
    format_summary,
    lengths,
    pick_adapters,
    summarize,
)


def test_lengths_follow_the_range_ratio():
    rng = random.Random(0)
    assert set(lengths(rng, 8, 1.0, 50)) == {8}
    drawn = lengths(rng, 8, 0.0, 2000)
    assert min(drawn) == 1 and max(drawn) == 8
    assert min(lengths(rng, 100, 0.5, 500)) >= 50


def test_adapter_distributions():
    names = [f"a{i}" for i in range(4)]
    rng = random.Random(1)
    assert pick_adapters(rng, names, "distinct", 9, 1.5) == [names[i % 4] for i in range(9)]
    uniform = Counter(pick_adapters(rng, names, "uniform", 8000, 1.5))
    assert all(abs(count - 2000) < 200 for count in uniform.values())
    skewed = Counter(pick_adapters(rng, names, "skewed", 8000, 1.5))
    expected = [1 / k ** 1.5 for k in range(1, 5)]
    for name, weight in zip(names, expected):
        assert skewed[name] / 8000 == pytest.approx(weight / sum(expected), abs=0.02)
    assert pick_adapters(rng, [], "uniform", 3, 1.5) == ["", "", ""]


def test_poisson_arrivals_have_the_requested_rate():
    times = arrival_times(random.Random(2), rate=4.0, count=4000)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.05)
    assert arrival_times(random.Random(2), math.inf, 3) == [0.0, 0.0, 0.0]


def test_workload_is_reproducible():
    args = argparse.Namespace(seed=7, random_input_len=32, random_output_len=16, random_range_ratio=0.0,
                              num_prompts=10, lora_name=["x", "y"], lora_request_distribution="distinct",
                              lora_zipf_alpha=1.5, request_rate=2.0)
    first, second = build_workload(args, 1000), build_workload(args, 1000)
    assert first == second
    assert all(1 <= len(w.input_ids) <= 32 and 1 <= w.output_len <= 16 for w in first)
    assert [w.adapter for w in first[:3]] == ["x", "y", "x"]


def test_summary_statistics():
    records = [Record(i, "", 10, 5, success=True, output_tokens=5, ttft_ms=10.0 * (i + 1),
                      e2e_ms=50.0 + 10.0 * (i + 1), itl_ms=[10.0] * 4) for i in range(3)]
    records.append(Record(3, "", 10, 5, error="UNAVAILABLE"))
    summary = summarize(records, duration_s=2.0)
    assert (summary["completed"], summary["failed"]) == (3, 1)
    assert summary["ttft_ms"]["median"] == 20.0 and summary["ttft_ms"]["p99"] == 30.0
    assert summary["tpot_ms"]["mean"] == pytest.approx(12.5)
    assert summary["output_token_throughput"] == 7.5
    table = format_comparison(["off", "on"], [summary, summarize(records[:2], 1.0)])
    assert "Median TTFT (ms)" in table and "%" in table


def test_the_summary_shows_how_lengths_were_spread():
    records = [Record(i, "", input_len, 16, success=True, output_tokens=output)
               for i, (input_len, output) in enumerate([(4, 1), (9, 15), (30, 8)])]
    summary = summarize(records, duration_s=1.0)
    assert summary["input_len"] == {"min": 4, "median": 9, "max": 30}
    assert summary["output_len"] == {"min": 1, "median": 8, "max": 15}
    table = format_summary(summary)
    assert "Input length min/median/max (tokens)" in table and "4/9/30" in table and "1/8/15" in table


def test_bench_help_shows_every_default_and_the_range_ratio(capsys):
    with pytest.raises(SystemExit):
        cli(["bench", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "[LEN * RATIO, LEN]" in help_text and "0.0 gives 1 to LEN" in help_text
    commands = argparse.ArgumentParser().add_subparsers()
    add_bench_parser(commands)
    bench = commands.choices["bench"]
    undocumented = [action.option_strings[0] for action in bench._actions
                    if action.option_strings and action.dest != "help" and "(default: " not in (action.help or "")]
    assert undocumented == []
