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
A failing check shows the values it compared: its modules are registered for
pytest's assertion rewriting (this file, which asserts nothing, is marked
PYTEST_DONT_REWRITE so that registering it while it is imported warns of nothing).
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest

# pytest rewrites asserts only in test modules, conftests and plugins, not in an installed
# package: registered here, before any check module is imported, a failing check in the
# user's run shows the values it compared, not a bare AssertionError. The check modules are
# imported lazily (below), so ``python -m influence_conformance`` imports none before its
# pytest starts (run_registered.py registers again under that pytest).
pytest.register_assert_rewrite("influence_conformance")

_EXPORTS = {
    "RTOL": "cases",
    "Case": "cases",
    "assert_close": "cases",
    "SPECS": "reference_specs",
    "ModelSpec": "specs",
    "ReferenceModel": "specs",
    "BackendConformance": "suite",
    "CrossBackendConformance": "suite",
}

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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'influence_conformance' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
