"""transformers beside the checkout: ours is `kernels`, and so is Hugging Face's package that
transformers >= 5.25 imports. bench.common.import_transformers lets both live under the name; these run in
a fresh interpreter with the checkout first on sys.path, as the benchmarks and the tests run."""

import importlib.metadata
import subprocess
import sys

import pytest
from conftest import ROOT

pytest.importorskip("transformers")

LOAD_A_MODEL = """
import torch
config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2)
model = transformers.AutoModelForCausalLM.from_config(config)
print(tuple(model(torch.tensor([[1, 2, 3]])).logits.shape))
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{code}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_transformers_loads_a_model_and_kernels_stays_ours():
    done = run("from bench.common import import_transformers\ntransformers = import_transformers()\n"
               + LOAD_A_MODEL + "import kernels\nprint(kernels.linear_logprobs.__module__)\n")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["(1,", "3,", "64)", "kernels"]


def test_without_the_helper_the_shadowing_breaks_transformers():
    """The failure the helper exists for (only where Hugging Face's `kernels` is installed: transformers
    >= 5.25 requires it; older ones never import it)."""
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed here (transformers < 5.25)")
    done = run("import kernels\nimport transformers\n" + LOAD_A_MODEL)
    assert done.returncode != 0 and "from 'kernels'" in done.stderr, done.stderr[-3000:]
