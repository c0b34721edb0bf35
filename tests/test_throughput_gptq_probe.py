"""The GPTQ dequantization probe (benchmarks/throughput_gptq_probe.py) times the right ops: on the CPU its chain must
rebuild the weights nibble by nibble, and without CUDA it must refuse with exit code 2 rather than time the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import throughput_gptq_probe as probe  # noqa: E402


def test_the_probe_chain_dequantizes_packed_int4_weights():
    # GPTQ packing (auto-gptq's QuantLinear.pack): weight row 8r + j is nibble j of qweight[r]; group g's zero point
    # for column 8c + j is nibble j of qzeros[g, c], stored minus one; w = scale * (code - (zero + 1))
    gen = torch.Generator().manual_seed(0)
    k, n = 256, 64
    qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, generator=gen)
    qzeros = torch.randint(-2**31, 2**31 - 1, (k // 128, n // 8), dtype=torch.int32, generator=gen)
    scales = torch.rand(k // 128, n, dtype=torch.float16, generator=gen)
    chain = probe.ops(torch, qweight, qzeros, scales)
    for _, fn, _ in chain:
        fn()
    state = next(c.cell_contents for c in chain[0][1].__closure__ if isinstance(c.cell_contents, dict))
    codes = torch.stack([(qweight >> (4 * j)) & 15 for j in range(8)], 1).reshape(k, n)
    zeros = torch.stack([(qzeros >> (4 * j)) & 15 for j in range(8)], 2).reshape(k // 128, n) + 1
    expected = scales.float().repeat_interleave(128, 0) * (codes - zeros.repeat_interleave(128, 0)).float()
    assert torch.allclose(state["w16"].reshape(k, n).float(), expected, atol=1e-2, rtol=1e-3)


def test_the_bytes_per_weight_sum_to_the_step_models_16_5():
    # the probe's per-op bytes are the ones step_time.DEQUANT_KERNELS["gptq-torch"] charges in total
    from vramcalc import step_time as st
    t = torch.zeros(16, 8, dtype=torch.int32)
    total = sum(b for _, _, b in probe.ops(torch, t, torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 8)))
    assert total == st.DEQUANT_KERNELS["gptq-torch"][0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_the_probe_refuses_without_cuda(capsys):
    assert probe.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
