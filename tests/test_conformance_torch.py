"""The PyTorch backend through the shared conformance suite."""

from influence_conformance import BackendConformance


class TestTorchConformance(BackendConformance):
    backend = "torch"
