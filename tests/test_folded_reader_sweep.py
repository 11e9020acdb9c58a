"""`benchmarks.folded_reader_sweep` on a machine without a GPU: its help, and a one-line refusal.
(It runs, shrunk, in `tests/gpu/test_gpu_folded_reader_sweep.py`.)"""

from __future__ import annotations

import pytest
import torch

from tests.benchmark_scripts import load_benchmark


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_the_sweep_refuses_a_machine_without_a_gpu_in_one_line(monkeypatch, capsys):
    bench = load_benchmark("folded_reader_sweep")  # imports without Triton
    monkeypatch.setattr("sys.argv", ["folded_reader_sweep"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    assert "times the folded readers on a CUDA GPU: this machine has none" in capsys.readouterr().err
