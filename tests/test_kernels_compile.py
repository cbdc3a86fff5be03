"""The Triton kernels compile for an H100 (sm_90) on this CPU machine: frontend, optimisation passes, ptxas.

The interpreter (TRITON_INTERPRET=1) that the numerical tests use runs the kernels as Python and checks
neither Triton's language rules (e.g. globals must be constexpr) nor register pressure; this does, for
every specialisation the wrappers launch, so a kernel that cannot compile fails here and not on a GPU.

The compiler cannot run in a process where the interpreter is on (it patches `triton.language`, and the
code generator then fails with "'value' object has no attribute 'dtype'"): the compilation runs in a child
process without TRITON_INTERPRET and with an empty Triton cache of its own, so that it compiles for real
and never reads a result some other run left behind (a warm cache once hid exactly that failure).
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest

NAMES, DTYPES, ENTROPY = ("row_logsumexp", "row_softmax_grad"), ("bf16", "fp32"), (False, True)
CASES = [(name, dtype, e) for name in NAMES for dtype in DTYPES for e in ENTROPY]
VOCAB = 151936  # the loop's trip count is a compile-time constant: Qwen's vocabulary
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


def compile_all() -> dict:
    """In the child process: every case -> {"cubin": bool, "usage": cuobjdump's REG/LOCAL/STACK line or None,
    "error": str or None}."""
    import shutil

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.cross_entropy import BLOCK_V, NUM_WARPS, row_logsumexp_kernel, row_softmax_grad_kernel

    kernels = {"row_logsumexp": (row_logsumexp_kernel, LSE_SIGNATURE),
               "row_softmax_grad": (row_softmax_grad_kernel, GRAD_SIGNATURE)}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    results = {}
    for name, dtype, with_entropy in CASES:
        kernel, signature = kernels[name]
        signature = {k: v.format(dt=dtype) for k, v in signature.items()}
        signature |= {"WITH_ENTROPY": "constexpr", "BLOCK_V": "constexpr", "N_BLOCKS": "constexpr"}
        constexprs = {"WITH_ENTROPY": with_entropy, "BLOCK_V": BLOCK_V,
                      "N_BLOCKS": triton.cdiv(VOCAB, BLOCK_V)}
        source = ASTSource(kernel, signature, constexprs=constexprs)
        key = f"{name}-{dtype}-{with_entropy}"
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": NUM_WARPS})
        except Exception as e:  # reported to the parent test, which fails with it
            results[key] = {"cubin": False, "usage": None, "error": f"{type(e).__name__}: {e}"}
            continue
        usage = None
        if "cubin" in compiled.asm and shutil.which(cuobjdump):
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                     text=True, check=True).stdout
            usage = " ".join(line for line in out.splitlines() if "REG:" in line)
        results[key] = {"cubin": "cubin" in compiled.asm, "usage": usage, "error": None}
    return results


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path_factory.mktemp("triton-cache")), "TRITON_DEFAULT_FP_FUSION": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("name,dtype,with_entropy", CASES)
def test_kernel_compiles_for_h100_without_spills(compiled, name, dtype, with_entropy):
    result = compiled[f"{name}-{dtype}-{with_entropy}"]
    assert result["error"] is None, result["error"]
    assert result["cubin"]
    if result["usage"] is not None:
        usage = result["usage"]
        assert "LOCAL:0" in usage and "STACK:0" in usage, f"register spills at the defaults: {usage}"


if __name__ == "__main__":  # the child process of the fixture
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps(compile_all()))
