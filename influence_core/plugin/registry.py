"""The backend registry: which backend handles which model or array.

Backends arrive as :class:`BackendSpec` records from the
``influence_core_backends`` hook of plugins registered under the
``influence_core.backends`` entry-point group, first-party backends included.
Loading is tolerant (a plugin that fails to import is skipped with a
:class:`~influence_core.errors.PluginLoadWarning`) and strict about identity
(two distributions claiming one backend name is an error naming both).

Types are matched by fully qualified class name against the object's MRO, so
asking "who handles this model?" never imports a framework the user did not
import.

Ownership: **NumPy arrays belong to the core.** ``array_namespace`` answers
array-api-compat's NumPy namespace for them before any plugin is asked, so a
backend whose framework computes on NumPy arrays (HIPS autograd) may list
``numpy.ndarray`` among its ``array_types`` without taking NumPy inputs from
anyone. Any other type claimed by two backends is ambiguous: asking who
handles it raises :class:`~influence_core.errors.AmbiguousBackendError`
naming both (pass ``backend=``), so installing a plugin can never change
another backend's results silently.
"""

from __future__ import annotations

import importlib
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from ..errors import (
    AmbiguousBackendError,
    BackendNotFoundError,
    DuplicateBackendError,
    InvalidBackendSpecError,
    PluginLoadWarning,
)
from .hookspecs import ENTRY_POINT_GROUP, PROJECT_NAME, BackendHookSpecs

__all__ = ["BackendRegistry", "BackendSpec", "get_registry"]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_QUALNAME = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$")
_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _check_reference(value: Any, what: str, name: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if callable(value) or (isinstance(value, str) and _REFERENCE.match(value)):
        return
    raise InvalidBackendSpecError(
        f"backend {name!r}: {what} must be a callable or a 'module:attribute' string, got {value!r}"
    )


def _resolve(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    module_name, _, attr = value.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        if not hasattr(obj, part) and hasattr(obj, "__path__"):  # a submodule not yet imported
            importlib.import_module(f"{obj.__name__}.{part}")
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class BackendSpec:
    """What a plugin tells influence_core about one backend.

    Attributes:
        name: short lowercase identifier users pass as ``backend=``.
        model_types: fully qualified names of model base classes this backend
            handles (matched against ``type(model).__mro__``, nothing imported).
        array_types: fully qualified names of its native array classes.
        kernels: ``(model, loss_fn, parameters, **options) -> ModelKernels``, or a
            ``"module:attribute"`` string naming it (imported on first use).
        namespace: the Array API namespace of the native arrays (a module or
            object, or a ``"module:attribute"`` string naming it, imported on first use).
        install_hint: how a user installs this backend's framework (shown when it is missing).
        requires: top-level modules the backend needs (``("torch",)``); checked
            with ``importlib.util.find_spec``, so nothing is imported. A backend
            whose requirement is missing is registered but unavailable.
        reference_models: optional ``"module:attribute"`` naming the builder the
            conformance suite uses (see :mod:`influence_conformance`).
        distribution: filled in by the loader: the distribution that provided it.
    """

    name: str
    model_types: tuple[str, ...]
    array_types: tuple[str, ...]
    kernels: Callable[..., Any] | str
    namespace: Any
    install_hint: str = ""
    reference_models: Callable[..., Any] | str | None = None
    requires: tuple[str, ...] = ()
    distribution: str = field(default="<runtime>", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise InvalidBackendSpecError(
                f"backend name {self.name!r} must be a lowercase identifier like 'torch'"
            )
        for attr in ("model_types", "array_types"):
            value = getattr(self, attr)
            if isinstance(value, str) or not isinstance(value, Iterable):
                raise InvalidBackendSpecError(
                    f"backend {self.name!r}: {attr} must be a tuple of qualified class names"
                )
            value = tuple(value)
            bad = [v for v in value if not isinstance(v, str) or not _QUALNAME.match(v)]
            if not value or bad:
                raise InvalidBackendSpecError(
                    f"backend {self.name!r}: {attr} must be non-empty qualified class names "
                    f"such as 'torch.nn.modules.module.Module'; got {list(value)}"
                )
            object.__setattr__(self, attr, value)
        if isinstance(self.requires, str) or not all(
            isinstance(r, str) and r for r in self.requires
        ):
            raise InvalidBackendSpecError(
                f"backend {self.name!r}: requires must be a tuple of module names, got "
                f"{self.requires!r}"
            )
        object.__setattr__(self, "requires", tuple(self.requires))
        _check_reference(self.kernels, "kernels", self.name)
        _check_reference(self.reference_models, "reference_models", self.name, optional=True)

    def missing_requirements(self) -> list[str]:
        """The modules in ``requires`` that are not installed (found without importing them)."""
        import importlib.util

        def found(name: str) -> bool:
            try:
                return importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):  # e.g. a module blocked in sys.modules
                return False

        return [name for name in self.requires if not found(name)]

    def handles_model(self, model: Any) -> bool:
        return _mro_matches(type(model), self.model_types)

    def handles_array(self, array: Any) -> bool:
        return _mro_matches(type(array), self.array_types)

    def load_kernels(self) -> Callable[..., Any]:
        return _resolve(self.kernels)

    def load_namespace(self) -> Any:
        return _resolve(self.namespace)

    def load_reference_models(self) -> Any:
        if self.reference_models is None:
            raise BackendNotFoundError(f"backend {self.name!r} ships no reference-model builder")
        return _resolve(self.reference_models)


def _is_numpy(array: Any) -> bool:
    """Whether ``array`` is a NumPy array or scalar (by MRO name: NumPy is not imported here)."""
    return any(c.__module__ == "numpy" for c in type(array).__mro__[:-1])


def _mro_matches(cls: type, names: tuple[str, ...]) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" in names for c in cls.__mro__)


class BackendRegistry:
    """Backends known to influence_core, loaded lazily from entry points."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self._pm = pluggy.PluginManager(PROJECT_NAME)
        self._pm.add_hookspecs(BackendHookSpecs)
        self._distributions: dict[str, str] = {}
        self._specs: dict[str, BackendSpec] | None = None
        self._load_entry_points = load_entry_points

    # -- registration -------------------------------------------------------------
    def register(self, plugin: Any, *, distribution: str = "<runtime>") -> None:
        """Register a plugin object or module (what an entry point would have loaded)."""
        name = self._pm.register(
            plugin, name=f"{distribution}:{getattr(plugin, '__name__', id(plugin))}"
        )
        if name is not None:
            self._distributions[name] = distribution
        self._specs = None

    def _load(self) -> None:
        from importlib import metadata  # lazily: it is a large part of import time (-X importtime)

        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "<unknown distribution>"
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not break us
                warnings.warn(
                    f"influence_core: skipped backend plugin {ep.name!r} from distribution "
                    f"{dist!r}: importing {ep.value!r} failed with {exc!r}",
                    PluginLoadWarning,
                    stacklevel=3,
                )
                continue
            if self._pm.is_registered(plugin):
                continue
            self.register(plugin, distribution=dist)

    @property
    def specs(self) -> dict[str, BackendSpec]:
        """Name → :class:`BackendSpec` of every successfully loaded backend."""
        if self._specs is None:
            if self._load_entry_points:
                self._load_entry_points = False
                self._load()
            self._specs = self._collect()
        return self._specs

    def _collect(self) -> dict[str, BackendSpec]:
        specs: dict[str, BackendSpec] = {}
        for impl in self._pm.hook.influence_core_backends.get_hookimpls():
            dist = self._distributions.get(impl.plugin_name, "<runtime>")
            try:
                records = list(impl.function())
                for record in records:
                    if not isinstance(record, BackendSpec):
                        raise InvalidBackendSpecError(
                            f"hook returned {type(record).__name__}, expected BackendSpec"
                        )
            except Exception as exc:
                warnings.warn(
                    f"influence_core: skipped backend plugin {impl.plugin_name!r}: its "
                    f"influence_core_backends hook failed with {exc!r}",
                    PluginLoadWarning,
                    stacklevel=4,
                )
                continue
            for record in records:
                if record.name in specs:
                    raise DuplicateBackendError(
                        f"backend name {record.name!r} is registered twice: by distribution "
                        f"{specs[record.name].distribution!r} and by distribution {dist!r}. "
                        "Uninstall one of them."
                    )
                specs[record.name] = _with_distribution(record, dist)
        return specs

    # -- lookup -------------------------------------------------------------------
    def names(self) -> list[str]:
        """The backends that can run here: registered, with their frameworks installed."""
        return sorted(name for name, spec in self.specs.items() if not spec.missing_requirements())

    def unavailable(self) -> dict[str, str]:
        """Registered backends whose frameworks are missing: name → what to install."""
        return {
            name: f"missing {', '.join(missing)}; {spec.install_hint or 'install it'}"
            for name, spec in sorted(self.specs.items())
            if (missing := spec.missing_requirements())
        }

    def by_name(self, name: str) -> BackendSpec:
        spec = self.specs.get(name)
        if spec is not None and not spec.missing_requirements():
            return spec
        if spec is not None:
            raise BackendNotFoundError(
                f"the backend {name!r} (from {spec.distribution!r}) is registered but cannot run "
                f"here: {self.unavailable()[name]}"
            )
        raise BackendNotFoundError(
            f"no backend named {name!r}; installed backends: {self.names() or 'none'}. "
            + _INSTALL_ADVICE
        )

    def for_model(self, model: Any) -> BackendSpec:
        matches = [self.specs[n] for n in self.names() if self.specs[n].handles_model(model)]
        if len(matches) == 1:
            return matches[0]
        what = f"a model of type {type(model).__module__}.{type(model).__qualname__}"
        if matches:
            raise AmbiguousBackendError(what, matches)
        raise BackendNotFoundError(
            f"no installed backend handles {what}; installed backends: "
            f"{self._describe()}. " + _INSTALL_ADVICE
        )

    def for_array(self, array: Any) -> BackendSpec | None:
        """The backend of a native array; ``None`` for NumPy (the core's) and unclaimed types."""
        if _is_numpy(array):
            return None
        matches = [self.specs[n] for n in self.names() if self.specs[n].handles_array(array)]
        if len(matches) > 1:
            raise AmbiguousBackendError(
                f"an array of type {type(array).__module__}.{type(array).__qualname__}", matches
            )
        return matches[0] if matches else None

    def _describe(self) -> str:
        if not self.specs:
            return "none"
        return ", ".join(
            f"{s.name} (models: {', '.join(s.model_types)})" for s in self.specs.values()
        )


def _with_distribution(spec: BackendSpec, distribution: str) -> BackendSpec:
    from dataclasses import replace

    return replace(spec, distribution=distribution)


_INSTALL_ADVICE = (
    "Install a backend distribution with its framework: pip install influence-core-torch "
    "(backends/torch; pins torch==2.13.0) or pip install influence-core-tensorflow "
    "(backends/tensorflow; tensorflow-cpu), "
    "or a third-party backend plugin."
)

_REGISTRY: BackendRegistry | None = None


def get_registry() -> BackendRegistry:
    """The process-wide registry (entry points are read on first use)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = BackendRegistry()
    return _REGISTRY
