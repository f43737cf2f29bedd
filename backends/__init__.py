"""First-party backends of influence_core, one package per framework.

Each backend has the same modules (Keras 3 style):

* ``plugin``: the pluggy hook implementation (imports no framework);
* ``model``: the :class:`~influence_core.protocol.ModelKernels` implementation;
* ``namespace``: the array namespace with ``top_k``;
* ``data``: iteration over the framework's datasets;
* ``reference_models``: builders for the conformance suite's model specs.
"""
