"""The torch network of a ``scale_specs`` model, for the peers' own venvs (torch and numpy only).

The conformance specs and the torch backend's reference-model builder are
loaded by file, so a peer's venv needs nothing of this repository installed.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


if "influence_conformance.specs" not in sys.modules:
    package = types.ModuleType("influence_conformance")
    package.__path__ = []
    sys.modules.setdefault("influence_conformance", package)
    _load("influence_conformance.specs", ROOT / "conformance_tests/influence_conformance/specs.py")
_reference = _load("torch_reference", ROOT / "backends/torch/influence_torch/reference_models.py")


def torch_model(spec_name: str, weights: list[Any], dtype: str = "float32") -> Any:
    """The torch module of ``scale_specs.SPECS[spec_name]`` with canonical ``weights``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scale_specs import SPECS

    return _reference.build(SPECS[spec_name], weights, dtype).model
