"""The fp32-output GEMMs of the CUDA lm head (kernels/linear_logprobs.py: mm_fp32, addmm_fp32_) survive
tracing, on this CPU machine: torch.compile (dynamo + AOT autograd, fullgraph) over fake CUDA tensors.

Tracing runs the ops' meta / fake implementations, not cuBLAS. On torch 2.11 the decomposition of
`addmm(..., out_dtype=)` takes out_dtype for beta and fails ("unsupported operand type(s) for *:
'torch.dtype' and 'FakeTensor'"), so the traced path must not call it: this test fails if it does.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kernels.linear_logprobs import addmm_fp32_, mm_fp32


def gemms(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    addmm_fp32_(acc, a, b)
    return acc, mm_fp32(a, b)


@pytest.mark.parametrize("backend", [
    "eager",  # dynamo's trace alone
    pytest.param("aot_eager", marks=pytest.mark.skipif(  # + AOT autograd's retrace of the graph
        not torch.backends.cuda.is_built(),
        reason="AOT autograd cannot trace CUDA tensors in a CPU-only torch build")),
])
def test_fp32_output_gemms_compile_over_fake_cuda_tensors(backend):
    torch._dynamo.reset()
    mode = FakeTensorMode()
    with mode:
        acc = torch.zeros(64, 32, device="cuda")
        a = torch.empty(64, 16, device="cuda", dtype=torch.bfloat16)
        b = torch.empty(16, 32, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(gemms, backend=backend, fullgraph=True)
    with mode:
        out, product = compiled(acc, a, b)
    assert out.dtype == product.dtype == torch.float32
    assert out.shape == product.shape == (64, 32) and out.device.type == "cuda"


def test_fp32_output_gemms_run_under_a_fake_mode():
    """The same without dynamo: what make_fx / export-style tracing hands the ops."""
    with FakeTensorMode():
        acc = torch.zeros(8, 4, device="cuda")
        a = torch.empty(8, 3, device="cuda", dtype=torch.bfloat16)
        b = torch.empty(3, 4, device="cuda", dtype=torch.bfloat16)
        out, product = gemms(acc, a, b)
        assert out.dtype == product.dtype == torch.float32 and out.shape == (8, 4)
