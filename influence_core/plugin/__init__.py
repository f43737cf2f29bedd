"""The plugin-author API: everything a backend for a new framework needs, and nothing else.

A backend is a separate distribution that implements :class:`ModelKernels`
for its framework, names an Array API namespace for its arrays, and
registers a :class:`BackendSpec` through the ``influence_core_backends``
hook under the ``influence_core.backends`` entry-point group
(``docs/writing-a-backend.md``). It proves itself with the conformance
suite (``influence_conformance``). Users never need this module: their API is
:mod:`influence_core`.
"""

# Errors a backend raises where it reads the framework's data (a shuffled or endless dataset).
from ..errors import DataOrderError, EndlessDataError, NonFiniteGradientError
from ..tree import tree_leaves, tree_map
from .hookspecs import ENTRY_POINT_GROUP, hookimpl
from .namespace import ArrayNamespace, numpy_namespace
from .outputs import OutputSelector, check_output_selector, select_output
from .parameters import layer_names, select_parameters
from .protocol import (
    LastLayer,
    Layer,
    ModelKernels,
    ParameterLayout,
    UnsupportedByBackendError,
    check_state,
)
from .registry import BackendRegistry, BackendSpec, get_registry

__all__ = [
    "ENTRY_POINT_GROUP",
    "ArrayNamespace",
    "BackendRegistry",
    "BackendSpec",
    "DataOrderError",
    "EndlessDataError",
    "LastLayer",
    "Layer",
    "ModelKernels",
    "NonFiniteGradientError",
    "OutputSelector",
    "ParameterLayout",
    "UnsupportedByBackendError",
    "check_output_selector",
    "check_state",
    "get_registry",
    "hookimpl",
    "layer_names",
    "numpy_namespace",
    "select_output",
    "select_parameters",
    "tree_leaves",
    "tree_map",
]
