"""The backend registry: typed records, validated names, a tolerant loader, no eager framework imports."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

import influence_core
from influence_core import (
    BackendNotFoundError,
    DuplicateBackendError,
    InvalidBackendSpecError,
    PluginLoadWarning,
)
from influence_core.plugin import BackendRegistry, BackendSpec, hookimpl


def fake_spec(name: str = "fake", **overrides: object) -> BackendSpec:
    fields = dict(
        name=name,
        model_types=("builtins.dict",),
        array_types=("builtins.list",),
        kernels="influence_core.plugin:ModelKernels",
        namespace="array_api_compat:numpy",
    )
    fields.update(overrides)
    return BackendSpec(**fields)


class Plugin:
    def __init__(self, *specs: BackendSpec) -> None:
        self.specs = specs

    @hookimpl
    def influence_core_backends(self) -> list[BackendSpec]:
        return list(self.specs)


def test_first_party_backends_arrive_through_entry_points() -> None:
    specs = influence_core.get_registry().specs
    assert {"torch", "tensorflow"} <= set(specs)
    # Each first-party backend is its own distribution, as a third-party plugin would be.
    assert specs["torch"].distribution == "influence-core-torch"
    assert specs["tensorflow"].distribution == "influence-core-tensorflow"
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="influence_core.backends")}
    assert eps["torch"] == "influence_torch.plugin"


def test_duplicate_backend_names_are_an_error_naming_both_distributions() -> None:
    registry = BackendRegistry(load_entry_points=False)
    registry.register(Plugin(fake_spec()), distribution="dist-one")
    registry.register(Plugin(fake_spec()), distribution="dist-two")
    with pytest.raises(DuplicateBackendError, match=r"'dist-one'.*'dist-two'"):
        registry.names()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "Bad Name"}, "lowercase identifier"),
        ({"model_types": "torch.nn.Module"}, "tuple of qualified class names"),
        ({"model_types": ("Module",)}, "qualified class names"),
        ({"array_types": ()}, "non-empty"),
        ({"kernels": "no colon here"}, "module:attribute"),
    ],
)
def test_malformed_records_are_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(InvalidBackendSpecError, match=message):
        fake_spec(**overrides)


def test_a_plugin_that_fails_to_import_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = metadata.EntryPoint(
        name="broken", value="no_such_module_for_influence_core", group="x"
    )
    monkeypatch.setattr(metadata, "entry_points", lambda group: [broken])
    registry = BackendRegistry()
    registry.register(Plugin(fake_spec("healthy")), distribution="ok-dist")
    with pytest.warns(PluginLoadWarning, match="no_such_module_for_influence_core"):
        assert registry.names() == ["healthy"]


def test_a_hook_that_raises_or_returns_junk_is_a_warning() -> None:
    class Raising:
        @hookimpl
        def influence_core_backends(self) -> list[BackendSpec]:
            raise RuntimeError("plugin bug")

    class Junk:
        @hookimpl
        def influence_core_backends(self) -> list[object]:
            return ["not a spec"]

    registry = BackendRegistry(load_entry_points=False)
    registry.register(Raising(), distribution="a")
    registry.register(Junk(), distribution="b")
    registry.register(Plugin(fake_spec("healthy")), distribution="c")
    with pytest.warns(PluginLoadWarning) as record:
        assert registry.names() == ["healthy"]
    assert len(record) == 2


def test_unknown_model_type_lists_backends_and_how_to_install() -> None:
    with pytest.raises(BackendNotFoundError) as info:
        influence_core.InfluenceModel(object(), loss_fn=None)
    message = str(info.value)
    assert "builtins.object" in message
    assert "torch" in message and "tensorflow" in message
    assert "pip install" in message
    with pytest.raises(BackendNotFoundError, match="no backend named 'mxnet'"):
        influence_core.InfluenceModel(object(), loss_fn=None, backend="mxnet")


def test_a_namespace_named_by_string_is_imported_on_first_use() -> None:
    import array_api_compat.numpy as compat_numpy

    assert fake_spec().load_namespace() is compat_numpy


def test_model_lookup_imports_no_framework() -> None:
    code = (
        "import sys, numpy as np, influence_core\n"
        "reg = influence_core.get_registry()\n"
        "assert set(reg.names()) >= {'torch', 'tensorflow'}\n"
        "try:\n    reg.for_model(object())\nexcept influence_core.BackendNotFoundError:\n    pass\n"
        "influence_core.array_namespace(np.ones(2))\n"
        "bad = [m for m in ('torch', 'tensorflow', 'keras', 'scipy', 'tqdm') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_backend_whose_framework_is_missing_is_unavailable_with_its_install_hint() -> None:
    registry = BackendRegistry(load_entry_points=False)
    missing = fake_spec(
        "ghost",
        requires=("no_such_framework_for_influence_core",),
        install_hint="pip install ghost",
    )
    registry.register(Plugin(missing, fake_spec("healthy", requires=("numpy",))), distribution="d")
    assert registry.names() == ["healthy"]
    assert registry.unavailable() == {
        "ghost": "missing no_such_framework_for_influence_core; pip install ghost"
    }
    with pytest.raises(BackendNotFoundError, match=r"registered but cannot run.*pip install ghost"):
        registry.by_name("ghost")
    with pytest.raises(InvalidBackendSpecError, match="requires"):
        fake_spec(requires="torch")


# -- issue 26, fault 16: who owns NumPy arrays, and what a second claim does ---------------
def test_numpy_arrays_stay_the_cores_and_a_second_claim_never_changes_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import numpy as np
    import torch

    from influence_core import AmbiguousBackendError, ExactIHVP, FirstOrderInfluenceCalculator
    from influence_core.data import take_samples
    from influence_core.plugin import registry as registry_module

    def self_influence(**settings):
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 2).double()
        model = influence_core.InfluenceModel(
            net, torch.nn.CrossEntropyLoss(reduction="none"), **settings
        )
        data = (np.random.default_rng(0).normal(size=(10, 3)), np.arange(10) % 2)
        calc = FirstOrderInfluenceCalculator(model, ExactIHVP(damping=0.1)).fit(data)
        return model.to_numpy(calc.self_influence(data))

    before = self_influence()
    everyone = BackendRegistry()
    hog = fake_spec(
        "numpyhog",
        model_types=("torch.nn.modules.module.Module",),
        array_types=("numpy.ndarray", "torch.Tensor"),
        namespace="array_api_compat:torch",  # a wrong namespace for NumPy arrays
    )
    everyone.register(Plugin(hog), distribution="numpy-hog")
    monkeypatch.setattr(registry_module, "_REGISTRY", everyone)

    # NumPy inputs keep the core's namespace: the plugin's claim on numpy.ndarray is inert
    assert influence_core.array_namespace(np.ones(2)).__name__ == "array_api_compat.numpy"
    assert everyone.for_array(np.ones(2)) is None
    np.testing.assert_array_equal(take_samples(np.arange(5.0), np.array([3, 1])), [3.0, 1.0])
    # Two claims on torch's types: an error naming both, never a silent pick
    with pytest.raises(AmbiguousBackendError, match=r"'numpyhog' \(from 'numpy-hog'\).*'torch'"):
        self_influence()
    with pytest.raises(AmbiguousBackendError, match=r"torch\.Tensor"):
        influence_core.array_namespace(torch.ones(2))
    # ... and naming the backend gives exactly the numbers it gave alone
    np.testing.assert_array_equal(self_influence(backend="torch"), before)
