"""``ParameterLayout``: the one record a backend gives for θ, refused at construction when wrong."""

from __future__ import annotations

import pytest

from influence_core.plugin import ParameterLayout

NAMES = ("fc.weight", "fc.bias")
SHAPES = ((3, 4), (3,))


def test_a_layout_derives_sizes_and_whether_it_is_canonical() -> None:
    native = ParameterLayout(NAMES, SHAPES, "float64")
    assert native.sizes == (12, 3) and native.size == 15 and native.is_canonical
    assert native.canonical_permutations == (None, None) and native.canonical_order == (0, 1)
    torch_like = ParameterLayout(NAMES, SHAPES, "float64", canonical_permutations=((1, 0), None))
    assert not torch_like.is_canonical
    nnx_like = ParameterLayout(
        ("fc/bias", "fc/kernel"), ((3,), (4, 3)), "f", canonical_order=(1, 0)
    )
    assert not nnx_like.is_canonical


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"names": ("a", "a")}, "unique; repeated: \\['a'\\]"),
        ({"shapes": ((3, 4),)}, "1 shapes for 2 parameter names"),
        ({"canonical_permutations": ((1, 0),)}, "1 canonical permutations for 2"),
        ({"canonical_permutations": ((0, 0), None)}, "not a permutation of its 2 axes"),
        ({"canonical_permutations": (None, (1, 0))}, "not a permutation of its 1 axes"),
        ({"canonical_order": (0, 0)}, "not a permutation of the 2 parameter indices"),
        ({"names": (), "shapes": ()}, "at least one parameter"),
    ],
)
def test_a_wrong_layout_is_refused_with_the_reason(fields, message) -> None:
    arguments = {"names": NAMES, "shapes": SHAPES, "dtype": "float64", **fields}
    with pytest.raises(ValueError, match=message):
        ParameterLayout(**arguments)
