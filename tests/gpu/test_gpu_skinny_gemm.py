"""The one-launch split-K projection kernel against F.linear, on CUDA.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.kernels import skinny_gemm
from worker.kernels.skinny_gemm import (MAX_TOKENS, NARROW_INPUT_TILES, WIDE_INPUT_TILES, GemmScratch, GemmTiles,
                                        skinny_linear, skinny_matmul)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
SHAPES = [  # (out, in, tiles): whole and ragged tiles and splits, one split, the tuned 8B shapes
    (4096, 4096, NARROW_INPUT_TILES),
    (4096, 14336, WIDE_INPUT_TILES),
    (200, 300, GemmTiles(n=64, k=32, k_per_split=64)),
    (96, 128, GemmTiles(n=32, k=64, k_per_split=128)),
]


@pytest.mark.parametrize("dtype", TOLERANCES, ids=str)
@pytest.mark.parametrize("tokens", [1, 9, MAX_TOKENS])
@pytest.mark.parametrize("out_features,in_features,tiles", SHAPES)
def test_the_kernel_gives_f_linear_and_repeats_bitwise(out_features, in_features, tiles, tokens, dtype):
    generator = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, in_features, device="cuda", dtype=dtype, generator=generator)
    weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype, generator=generator) / in_features**0.5
    scratch = GemmScratch.allocate(out_features, in_features, x.device, (tiles,))
    scratch.partials.fill_(float("nan"))  # the kernel reads only partials it wrote
    first = skinny_matmul(x, weight, scratch, tiles)
    assert torch.equal(scratch.counters, torch.zeros_like(scratch.counters)), "counters left non-zero"
    second = skinny_matmul(x, weight, scratch, tiles)
    assert torch.equal(first, second), "the split sums depend on scheduling"
    tolerance = TOLERANCES[dtype]
    torch.testing.assert_close(first, F.linear(x, weight), atol=tolerance, rtol=tolerance)


def test_skinny_linear_routes_only_narrow_bias_free_projections_of_few_tokens(monkeypatch):
    hidden, intermediate = 256, 512
    linear = skinny_linear(GemmScratch.allocate(hidden, intermediate, torch.device("cuda")))
    launches = []
    monkeypatch.setattr(skinny_gemm, "skinny_matmul", lambda *args: launches.append(args) or skinny_matmul(*args))
    x = torch.randn(MAX_TOKENS, intermediate, device="cuda")
    down = torch.randn(hidden, intermediate, device="cuda")
    torch.testing.assert_close(linear(x, down, None), F.linear(x, down), atol=1e-3, rtol=1e-4)
    assert len(launches) == 1
    linear(x[:, :hidden], torch.randn(intermediate, hidden, device="cuda"), None)  # output wider than input
    linear(x, down, torch.zeros(hidden, device="cuda"))  # a bias
    linear(torch.randn(MAX_TOKENS + 1, intermediate, device="cuda"), down, None)  # too many tokens
    assert len(launches) == 1, "cuBLAS should have taken the others"


def test_a_graph_replays_the_kernel_with_new_inputs():
    tiles = NARROW_INPUT_TILES
    x = torch.zeros(9, 4096, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64
    scratch = GemmScratch.allocate(4096, 4096, x.device, (tiles,))
    skinny_matmul(x, weight, scratch, tiles)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = skinny_matmul(x, weight, scratch, tiles)
    for seed in range(3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
        graph.replay()
        torch.testing.assert_close(out, F.linear(x, weight), atol=2e-2, rtol=2e-2)
