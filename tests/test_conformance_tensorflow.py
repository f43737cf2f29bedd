"""The TensorFlow backend through the shared conformance suite."""

from influence_conformance import BackendConformance


class TestTensorFlowConformance(BackendConformance):
    backend = "tensorflow"
