"""The Triton kernels compile for an H100 (sm_90) on this CPU machine: frontend, optimisation passes, ptxas.

The interpreter (TRITON_INTERPRET=1) that the numerical tests use runs the kernels as Python and checks
neither Triton's language rules (e.g. globals must be constexpr) nor register pressure; this does, for
every specialisation the wrappers launch, so a kernel that cannot compile fails here and not on a GPU.
"""

import os
import shutil
import subprocess
import tempfile

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from kernels.cross_entropy import BLOCK_V, NUM_WARPS, row_logsumexp_kernel, row_softmax_grad_kernel

H100 = GPUTarget("cuda", 90, 32)
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

LSE_SIGNATURE = {
    "logits_ptr": "*{dt}", "logits_row_stride": "i64", "targets_ptr": "*i64", "lse_ptr": "*fp32",
    "out_ptr": "*fp32", "entropy_ptr": "*fp32", "n_cols": "i32", "logit_scale": "fp32", "out_sign": "fp32",
}
GRAD_SIGNATURE = {
    "logits_ptr": "*{dt}", "logits_row_stride": "i64", "grad_ptr": "*{dt}", "grad_row_stride": "i64",
    "targets_ptr": "*i64", "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "g_ptr": "*fp32", "g_stride": "i32",
    "g_entropy_ptr": "*fp32", "g_entropy_stride": "i32", "n_cols": "i32", "col_offset": "i32",
    "logit_scale": "fp32", "grad_scale": "fp32",
}


def compile_for_h100(kernel, signature: dict, dtype: str, with_entropy: bool):
    fn = JITFunction(kernel.fn)  # a compilable kernel from the plain function, also under the interpreter
    signature = {k: v.format(dt=dtype) for k, v in signature.items()} | {"WITH_ENTROPY": "constexpr",
                                                                          "BLOCK_V": "constexpr"}
    source = ASTSource(fn, signature, constexprs={"WITH_ENTROPY": with_entropy, "BLOCK_V": BLOCK_V})
    return triton.compile(source, target=H100, options={"num_warps": NUM_WARPS})


def spills(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    return " ".join(line for line in out.splitlines() if "REG:" in line)


@pytest.mark.skipif(not os.path.exists(os.path.join(NVIDIA_BIN, "ptxas")), reason="triton ships no ptxas")
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("name", ["row_logsumexp", "row_softmax_grad"])
def test_kernel_compiles_for_h100_without_spills(name, dtype, with_entropy):
    kernel, signature = {"row_logsumexp": (row_logsumexp_kernel, LSE_SIGNATURE),
                         "row_softmax_grad": (row_softmax_grad_kernel, GRAD_SIGNATURE)}[name]
    compiled = compile_for_h100(kernel, signature, dtype, with_entropy)
    assert "cubin" in compiled.asm
    if shutil.which(os.path.join(NVIDIA_BIN, "cuobjdump")):
        usage = spills(compiled.asm["cubin"])
        assert "LOCAL:0" in usage and "STACK:0" in usage, f"register spills at the defaults: {usage}"
