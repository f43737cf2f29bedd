"""A flax.nnx module with two outputs: the loss reads the one ``output=`` names (issue 25, item 3)."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from influence_core import EKFACIHVP, FirstOrderInfluenceCalculator, InfluenceModel  # noqa: E402
from influence_core.errors import ModelOutputError  # noqa: E402


class TwoHeads(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.body = nnx.Linear(4, 8, rngs=rngs, param_dtype=jnp.float64)
        self.head = nnx.Linear(8, 3, rngs=rngs, param_dtype=jnp.float64)
        self.aux = nnx.Linear(8, 2, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        h = jnp.tanh(self.body(x))
        return {"logits": self.head(h), "aux": self.aux(h)}, self.aux(h)


class OneHead(nnx.Module):
    def __init__(self, two: TwoHeads) -> None:
        self.body, self.head = two.body, two.head

    def __call__(self, x):
        return self.head(jnp.tanh(self.body(x)))


def loss(outputs, targets):
    log_p = jax.nn.log_softmax(outputs)
    return -jnp.take_along_axis(log_p, targets[:, None].astype(jnp.int32), axis=1)[:, 0]


def test_an_nnx_module_s_chosen_output_is_what_every_kernel_reads() -> None:
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20, 4)), rng.integers(0, 3, 20)
    two = TwoHeads(nnx.Rngs(0))
    with pytest.raises(ModelOutputError, match="a tuple of 2"):
        InfluenceModel(two, loss).per_sample_loss((X, y))
    chosen = InfluenceModel(two, loss, output=lambda o: o[0]["logits"], parameters=["body", "head"])
    alone = InfluenceModel(OneHead(two), loss)
    np.testing.assert_allclose(chosen.per_sample_loss((X, y)), alone.per_sample_loss((X, y)))
    got = FirstOrderInfluenceCalculator(chosen, EKFACIHVP(damping=0.1)).fit((X, y))
    want = FirstOrderInfluenceCalculator(alone, EKFACIHVP(damping=0.1)).fit((X, y))
    np.testing.assert_allclose(got.self_influence(), want.self_influence(), rtol=1e-10)
