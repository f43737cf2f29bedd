"""Which of a model's outputs the loss and measurements read: written once, applied by every backend.

Users' models return more than one array: Hugging Face models a ``ModelOutput``
(a mapping with ``logits``, ``hidden_states`` …), multi-head models a tuple,
Keras functional models a dict or list. Influence is computed on one of them,
Φ(x), the array the per-sample loss and every measurement take. A backend
applies :func:`select_output` to what the model returns, at every model call,
with the user's ``InfluenceModel(output=...)``:

* ``None`` (default): an array as it is; a mapping's ``"logits"`` (the Hugging
  Face convention); anything else is refused, naming what it holds;
* a string: that key (a mapping, a ``ModelOutput``) or attribute;
* an integer: that position (a tuple, a list, a ``ModelOutput``);
* a callable: ``output(outputs) -> array``, written with the framework's ops.

Written with duck typing only, so no framework is imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ModelOutputError

__all__ = ["OutputSelector", "check_output_selector", "select_output"]

#: What ``InfluenceModel(output=)`` takes.
OutputSelector = str | int | Callable[[Any], Any] | None


def check_output_selector(output: Any) -> Any:
    """``output`` if it is a valid selector (``None``, a string, an integer or a callable)."""
    if output is None or isinstance(output, (str, int)) or callable(output):
        if isinstance(output, bool):
            raise TypeError("output= takes a key, an index or a callable, not a bool")
        return output
    raise TypeError(
        f"output= takes a key (e.g. 'logits'), an index (e.g. 0) or a callable "
        f"outputs -> array, got {type(output).__name__}"
    )


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _describe(outputs: Any) -> str:
    if isinstance(outputs, Mapping):
        return f"a {type(outputs).__name__} with keys {list(outputs.keys())}"
    if isinstance(outputs, (tuple, list)):
        kinds = [
            f"{i}: {tuple(v.shape)}" if _is_array(v) else f"{i}: {type(v).__name__}"
            for i, v in enumerate(outputs)
        ]
        return f"a {type(outputs).__name__} of {len(outputs)} ({', '.join(kinds)})"
    return f"a {type(outputs).__name__}"


def select_output(outputs: Any, output: OutputSelector = None) -> Any:
    """Φ(x): the array the loss reads, picked from what the model returned (see the module docstring)."""
    if output is None:
        if _is_array(outputs):
            return outputs
        if isinstance(outputs, Mapping) and "logits" in outputs:
            return outputs["logits"]
        raise ModelOutputError(
            f"the model returns {_describe(outputs)}, not one array; say which output the loss "
            "and measurements read: InfluenceModel(..., output='logits') for a key, output=0 "
            "for a position, or output=lambda outputs: ... for anything else"
        )
    if callable(output):
        chosen = output(outputs)
    elif isinstance(output, str):
        if isinstance(outputs, Mapping) and output in outputs:
            chosen = outputs[output]
        elif not isinstance(outputs, Mapping) and hasattr(outputs, output):
            chosen = getattr(outputs, output)
        else:
            raise ModelOutputError(f"output={output!r}, but the model returns {_describe(outputs)}")
    else:
        try:
            chosen = (
                list(outputs.values())[output] if isinstance(outputs, Mapping) else outputs[output]
            )
        except (IndexError, TypeError, KeyError):
            raise ModelOutputError(
                f"output={output!r}, but the model returns {_describe(outputs)}"
            ) from None
    if not _is_array(chosen):
        raise ModelOutputError(
            f"output={output!r} picks a {type(chosen).__name__} from {_describe(outputs)}; it "
            "must pick one array (the logits the loss reads)"
        )
    return chosen
