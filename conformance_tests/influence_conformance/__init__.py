"""The conformance suite every influence_core backend runs.

* :class:`BackendConformance`: one backend's kernels against closed forms
  (linear and softmax regression), 5-point finite differences (MLPs, a conv
  net), their own Hessians, and the protocol's data and error contracts, in
  float64 (1e-8 relative) and float32 (1e-4 relative).
* :class:`CrossBackendConformance`: the same specs and weights through every
  installed backend give the same numbers.

Run against a registered backend with one command::

    python -m influence_conformance --backend NAME

or subclass the classes in your own tests (see :mod:`influence_conformance.suite`).
"""

from .cases import RTOL, Case, assert_close
from .reference_specs import SPECS
from .specs import ModelSpec, ReferenceModel
from .suite import BackendConformance, CrossBackendConformance

__all__ = [
    "RTOL",
    "SPECS",
    "BackendConformance",
    "Case",
    "CrossBackendConformance",
    "ModelSpec",
    "ReferenceModel",
    "assert_close",
]
