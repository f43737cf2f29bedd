"""The JAX plugin through the shared conformance suite, as any third-party backend runs it.

* flax.nnx modules (the registered reference builder): the suite's float64
  checks on the conv net (not the calculator contracts), in a process where torch and
  TensorFlow cannot be imported, through the suite's own command
  (``python -m influence_conformance --backend jax -k …``);
* pure ``Functional(apply_fn, params)`` models (the suite's
  ``reference_builder`` hook), in this process.

float64 and float32 both; x64 is switched on for float64 (``JAX_ENABLE_X64``).
"""

import os
import subprocess
import sys

import jax

jax.config.update("jax_enable_x64", True)  # the suite checks float64 to 1e-8

from influence_conformance import BackendConformance  # noqa: E402
from influence_jax.reference_models import build_functional  # noqa: E402

#: float32, the calculator contracts and the dense-only specs run in this process on
#: Functional models (below) and in the three-framework test; the subprocess keeps every
#: float64 check of the nnx conv net (a convolution and a dense head), and the checks that
#: take no spec.
SELECTION = (
    "not float32 and not keeps_its_contract and not linear_regression "
    "and not logistic_regression and not mlp_relu and not mlp_tanh"
)

WITHOUT_TORCH_OR_TENSORFLOW = f"""
import sys
for name in ("torch", "tensorflow", "keras", "tf_keras"):
    sys.modules[name] = None  # importing them now fails, as if they were not installed
from influence_conformance.__main__ import main
sys.exit(main(["--backend", "jax", "-q", "-p", "no:warnings", "-k", {SELECTION!r}]))
"""


def test_the_float64_suite_passes_with_neither_torch_nor_tensorflow() -> None:
    env = {**os.environ, "JAX_ENABLE_X64": "1"}
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH_OR_TENSORFLOW], capture_output=True, text=True, env=env
    )
    tail = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail, tail
    print(tail.strip().splitlines()[-1])


class TestJaxFunctionalConformance(BackendConformance):
    backend = "jax"

    def reference_builder(self):
        return build_functional
