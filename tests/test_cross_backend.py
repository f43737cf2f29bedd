"""PyTorch and TensorFlow give the same numbers on the same specs and weights."""

from influence_conformance import CrossBackendConformance


class TestTorchAgreesWithTensorFlow(CrossBackendConformance):
    backends = ("torch", "tensorflow")
