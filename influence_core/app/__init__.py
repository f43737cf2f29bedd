"""The influence-core application: the ``demo`` and ``compare`` commands, and their figures.

A client of the public API (:mod:`influence_core`) and of the conformance
suite's framework-neutral model specs; nothing in the library imports it.
"""
