"""The folded-expand stand-in reader that `benchmarks.fused_shrink_gemm` times, against torch.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu/test_gpu_reader_expand.py`; with
`TRITON_INTERPRET=1`, on CPU tensors in Triton's interpreter (float32 only there).
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CASES = [("cuda", dtype) for dtype in (torch.float32, torch.bfloat16)] * torch.cuda.is_available()
CASES += [("cpu", torch.float32)] * INTERPRET
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CASES, reason="needs a CUDA GPU (or TRITON_INTERPRET=1)")]


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("decodes,prompt,slots,rank,outputs", [(5, 30, 3, 16, 200), (8, 4, 8, 128, 130),
                                                               (9, 0, 4, 16, 64)])
def test_the_reader_adds_each_blocks_slot_expand_and_leaves_padding(device, dtype, decodes, prompt, slots, rank,
                                                                    outputs):
    from benchmarks._reader_expand_triton import read_back, row_blocks

    generator = torch.Generator().manual_seed(0)
    tokens = decodes + prompt + 3  # three padding rows, in no block
    y = torch.randn(tokens, outputs, generator=generator).to(device, dtype)
    h = torch.randn(tokens, slots * rank + 5, generator=generator).to(device, dtype)
    b = (torch.randn(slots, rank, outputs, generator=generator) / rank).to(device, dtype)
    blocks = row_blocks(decodes, prompt, slots, rank).to(device)
    assert blocks[:, 0].tolist() == [row % slots for row in range(decodes)] + [0] * (blocks.shape[0] - decodes)
    expected = y.float()
    for slot, start, end, _ in blocks.tolist():
        rows = slice(start, end)
        expected[rows] += (h[rows, slot * rank:(slot + 1) * rank].float() @ b[slot].float()).to(dtype).float()
    untouched = y.clone()
    read_back(y, h, b, blocks, expand=False)
    assert torch.equal(y, untouched)
    read_back(y, h, b, blocks, expand=True)
    tolerance = 2e-3 if dtype == torch.float32 else 2e-2  # float32 dots run on TF32 on the GPU
    torch.testing.assert_close(y.float(), expected, atol=tolerance, rtol=tolerance)
    assert torch.equal(y[decodes + prompt:], untouched[decodes + prompt:])
