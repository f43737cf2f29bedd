"""Influence from a low-rank eigendecomposition of the Hessian (Schioppa et al. 2022)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..fingerprint import parameter_fingerprint
from ..ihvp import ArnoldiIHVP
from ..ihvp.base import DEFAULT_DAMPING
from ..model import InfluenceModel
from .first_order import Array, FirstOrderInfluenceCalculator

__all__ = ["ArnoldiInfluenceCalculator"]

_ARRAYS = "eigenpairs.npz"
_META = "eigenpairs.json"


class ArnoldiInfluenceCalculator(FirstOrderInfluenceCalculator):
    """First-order influence computed in the k-dimensional top eigenspace of H.

    With the k largest eigenpairs (λ_j, u_j) of the Hessian of the mean
    training loss (from :class:`~influence_core.ArnoldiIHVP`, computed once),
    every gradient is projected to p(z) = D^{-1/2} Uᵀ g(z) ∈ ℝᵏ with
    D = diag(λ_j + λ), and::

        score(z_train, z_test) = p(z_test)ᵀ p(z_train)
                               ≈ g(z_test)ᵀ (H + λI)⁻¹ g(z_train)

    (Schioppa, Zablotskaia, Vilar, Sokolov, "Scaling Up Influence Functions",
    AAAI 2022). Same sign convention as :class:`FirstOrderInfluenceCalculator`:
    positive means proponent. Training batches cost one (b × d)(d × k) product
    and one (b × k)(k × n_test) product; self-influence is ‖p(z)‖².

    The approximation drops H outside its top-k eigenspace: at k = d it equals
    exact influence; on a convex digits model (d = 650) Pearson against exact is
    0.38 at k = 10, 0.95 at k = 100, 0.996 at k = d/3
    (``tests/test_arnoldi_rank.py``).

    The eigenpairs can be saved (:meth:`save`, NumPy ``.npz`` without pickle,
    plus JSON metadata with a fingerprint of θ) and reused (:meth:`load`).

    Args:
        model: the :class:`~influence_core.InfluenceModel`.
        train_data: the training data (defines H, and is scored when a method is given none).
        rank: k, the number of eigenpairs kept (see :class:`~influence_core.ArnoldiIHVP`).
        iterations: Arnoldi iterations (default 2k).
        damping: λ.
        seed: seed of the start vector.
        ihvp: an already fitted :class:`~influence_core.ArnoldiIHVP` (then the
            four arguments above are ignored).
        normalize: RelatIF scores.
        batch_size: batch size for ``(X, y)`` arrays.
    """

    def __init__(
        self,
        model: InfluenceModel,
        train_data: Any,
        *,
        rank: int = 50,
        iterations: int | None = None,
        damping: float = DEFAULT_DAMPING,
        seed: int = 0,
        ihvp: ArnoldiIHVP | None = None,
        normalize: bool = False,
        batch_size: int | None = None,
    ) -> None:
        if ihvp is None:
            ihvp = ArnoldiIHVP(
                model,
                train_data,
                damping=damping,
                batch_size=batch_size,
                rank=rank,
                iterations=iterations,
                seed=seed,
            )
        super().__init__(model, train_data, ihvp, normalize=normalize, batch_size=batch_size)
        xp = self.xp
        shifted = ihvp.eigenvalues + ihvp.damping
        #: U D^{-1/2}, shape (d, k): projects a gradient into the eigenspace.
        self.projection = ihvp.eigenvectors / xp.reshape(xp.sqrt(shifted), (1, -1))
        self._inverse_shift = xp.reshape(1.0 / shifted, (1, -1))

    @property
    def rank(self) -> int:
        return int(self.projection.shape[1])

    def project(self, data: Any) -> Array:
        """p(z) = D^{-1/2} Uᵀ g(z) for every sample: shape (n, k)."""
        parts = [self._train_side(g) for _, g in self._gradients(data)]
        return parts[0] if len(parts) == 1 else self.xp.concat(parts, axis=0)

    def solve_test_gradients(self, test_data: Any) -> Array:
        """The test side in the eigenspace: p(z_test) stacked as columns, shape (k, n_test)."""
        return self.xp.matrix_transpose(self.project(test_data))

    def _train_side(self, grads: Array) -> Array:
        return self.xp.matmul(grads, self.projection)

    def _relatif_norms(self, grads: Array) -> Array:
        """‖(H + λI)⁻¹ g‖ = ‖D⁻¹ Uᵀ g‖ (U has orthonormal columns)."""
        xp = self.xp
        coefficients = xp.matmul(grads, self.ihvp.eigenvectors) * self._inverse_shift
        return xp.linalg.vector_norm(coefficients, axis=1)

    # -- persistence -------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the eigenpairs (``eigenpairs.npz``) and metadata (``eigenpairs.json``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ihvp, host = self.ihvp, self.model.to_numpy
        np.savez(
            directory / _ARRAYS,
            eigenvalues=host(ihvp.eigenvalues),
            eigenvectors=host(ihvp.eigenvectors),
        )
        meta = {
            "method": "arnoldi",
            "rank": self.rank,
            "iterations": ihvp.iterations,
            "seed": ihvp.seed,
            "damping": ihvp.damping,
            "num_parameters": self.model.num_parameters,
            "parameter_names": list(self.model.parameter_names),
            "parameter_fingerprint": parameter_fingerprint(self.model),
        }
        (directory / _META).write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        model: InfluenceModel,
        train_data: Any = None,
        *,
        normalize: bool = False,
        batch_size: int | None = None,
        check_fingerprint: bool = True,
    ) -> ArnoldiInfluenceCalculator:
        """Rebuild a calculator from :meth:`save` output, without recomputing eigenpairs.

        Refuses (``ValueError``) eigenpairs computed for other parameters: a
        different selection, size, or (with ``check_fingerprint``) other values of θ.
        """
        directory = Path(directory)
        meta = json.loads((directory / _META).read_text())
        if meta.get("method") != "arnoldi":
            raise ValueError(f"{directory} does not hold Arnoldi eigenpairs")
        if meta["parameter_names"] != list(model.parameter_names):
            raise ValueError(
                f"the eigenpairs in {directory} are for parameters {meta['parameter_names']}, "
                f"but the model selects {list(model.parameter_names)}"
            )
        if check_fingerprint and meta["parameter_fingerprint"] != parameter_fingerprint(model):
            raise ValueError(
                f"the eigenpairs in {directory} were computed at other parameter values "
                "(fingerprint mismatch); recompute them, or pass check_fingerprint=False"
            )
        with np.load(directory / _ARRAYS, allow_pickle=False) as arrays:
            ihvp = ArnoldiIHVP.from_eigenpairs(
                model, arrays["eigenvalues"], arrays["eigenvectors"], damping=meta["damping"]
            )
        ihvp.iterations, ihvp.seed = int(meta["iterations"]), int(meta["seed"])
        return cls(model, train_data, ihvp=ihvp, normalize=normalize, batch_size=batch_size)
