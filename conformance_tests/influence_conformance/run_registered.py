"""The test module ``python -m influence_conformance`` runs (backends from the environment)."""

from __future__ import annotations

import os

import pytest

pytest.register_assert_rewrite("influence_conformance")  # under this pytest, before the checks

from influence_conformance import BackendConformance, CrossBackendConformance  # noqa: E402

_BACKENDS = tuple(b for b in os.environ.get("INFLUENCE_CONFORMANCE_BACKENDS", "").split(",") if b)

for _name in _BACKENDS:
    globals()[f"Test_{_name}"] = type(f"Test_{_name}", (BackendConformance,), {"backend": _name})

if len(_BACKENDS) > 1:

    class TestCrossBackend(CrossBackendConformance):
        backends = _BACKENDS
