"""The interface every inverse-Hessian-vector-product solver implements: configure, fit, solve.

A solver is built with its settings only (``ExactIHVP(damping=1e-3)``), does its
expensive work in :meth:`~InverseHessianVectorProduct.fit` (which returns the
solver), and keeps what it fitted in attributes with a trailing underscore
(``inverse_``, ``eigenvalues_``, ``residuals_``), the scikit-learn convention.
A new solver subclasses :class:`InverseHessianVectorProduct`, implements
``_fit`` and ``_solve_block``, and is exported from :mod:`influence_core.ihvp`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..data import Batch, is_array_pair, leading_dim
from ..errors import CostLimitError, FingerprintMismatchError, NotFittedError
from ..io import (
    data_fingerprint,
    load_result,
    parameter_fingerprint,
    save_result,
    weights_fingerprint,
)
from ..model import InfluenceModel, check_curvature
from ..plugin.namespace import ArrayNamespace
from ..sums import ShardedData

__all__ = [
    "DEFAULT_DAMPING",
    "ITERATIVE_CURVATURE",
    "PER_POINT_LIMIT",
    "GradientTrainingSide",
    "InverseHessianVectorProduct",
    "TrainingSide",
    "known_size",
]

#: Default damping λ added to the curvature of the mean loss: H + λI (exact, CG,
#: Arnoldi; LiSSA has its own, :data:`~influence_core.ihvp.LISSA_DAMPING`). Chosen on the panel of ``benchmarks/defaults_panel.py`` (docs/choosing.md): at
#: 1e-2 CG is within the 95 % interval of its best damping on all four panel models and
#: completes on each; at the former 1e-3 it lost 0.11 LDS on softmax regression and
#: refused the 0.1M-parameter MLP (negative curvature). For a model trained with an L2
#: penalty (μ/2)‖θ‖² on the mean loss, ``damping=μ`` is the Hessian of the training
#: objective; :func:`influence_core.evaluation.select` compares dampings on your model.
DEFAULT_DAMPING = 1e-2

#: Default curvature of the iterative solvers (CG, LiSSA, Arnoldi): the Gauss–Newton
#: matrix, positive semi-definite for a convex loss, so a non-convex network never stops
#: them. On the panel's transformer (``benchmarks/defaults_panel.py``) the damped Hessian
#: is not positive definite at λ ≤ 1e-2 (CG refused, LiSSA diverged at any scale); on the
#: other four panel models the two curvatures are within each other's 95 % intervals
#: (docs/choosing.md). :class:`~influence_core.ihvp.ExactIHVP` keeps the Hessian.
ITERATIVE_CURVATURE = "ggn"

#: Default cap of an iterative solver on the estimated work of solving per training
#: point (self-influence, RelatIF): d × n_points × per-sample HVPs per solved block,
#: about 1e12 multiply-adds. The 1000-point digits problem with CG at 100 iterations
#: is 6.5e10; the 0.1M-parameter MLP with 2000 points is 4e13 (over 15 minutes here).
PER_POINT_LIMIT = 1e12

Array = Any
Solver = TypeVar("Solver", bound="InverseHessianVectorProduct")


class TrainingSide(ABC):
    """One training batch as a solver sees it (what first-order scores need of it).

    :meth:`scores` meets the solver's stacked
    :meth:`InverseHessianVectorProduct.test_side` (m, n_test);
    :meth:`quadratic_forms` and :meth:`solved_norms` give self-influence and
    the RelatIF norms. A solver decides how they are computed: from per-sample
    gradients (the default, :class:`GradientTrainingSide`), or layer by layer
    from layer-wise statistics with no (b, d) matrix (K-FAC, EK-FAC).
    """

    @abstractmethod
    def scores(self, solved: Array) -> Array:
        """First-order scores of this batch against the test side (m, n_test): shape (n_test, b)."""

    @abstractmethod
    def quadratic_forms(self) -> Array:
        """gᵢᵀ (H + λI)⁻¹ gᵢ for each sample: shape (b,)."""

    @abstractmethod
    def solved_norms(self) -> Array:
        """‖(H + λI)⁻¹ gᵢ‖ for each sample: shape (b,)."""

    def scores_and_quadratic_forms(self, joint: Array) -> tuple[Array, Array]:
        """:meth:`scores` (n_test, b) and :meth:`quadratic_forms` (b,) in one call.

        ``joint`` is the solved test block from
        :meth:`InverseHessianVectorProduct.solved_test_side` with ``joint=True``.
        By default that is the usual block and this is the two calls; a solver
        whose scores and self-influence share work (a rotation into its
        eigenbasis) overrides both.
        """
        return self.scores(joint), self.quadratic_forms()


class GradientTrainingSide(TrainingSide):
    """The default: the batch's per-sample gradients G (b, d), through the solver's own methods."""

    def __init__(self, solver: InverseHessianVectorProduct, grads: Array) -> None:
        self.solver, self.grads = solver, grads

    def scores(self, solved: Array) -> Array:
        xp = self.solver.xp
        return xp.matrix_transpose(xp.matmul(self.solver.train_side(self.grads), solved))

    def quadratic_forms(self) -> Array:
        return self.solver.quadratic_forms(self.grads)

    def solved_norms(self) -> Array:
        return self.solver.solved_norms(self.grads)


class InverseHessianVectorProduct(ABC):
    """Solves (H + λI) X = V for a block of right-hand sides.

    H = ∇²_θ L(θ) is the Hessian of the *mean* loss L(θ) = (1/n) Σ_i ℓ(z_i, θ)
    over the data the solver is fitted on (the training set), at the model's
    parameters when fitted, and λ = ``damping``. Every solver works only
    through the autodiff protocol (:class:`~influence_core.InfluenceModel`) and
    the array namespace, so it runs unchanged on every backend.

    Args:
        damping: λ ≥ 0.
        batch_size: batch size for ``(X, y)`` arrays (default: the model's).
        curvature: ``"hessian"`` (H, the default here and for ExactIHVP; CG,
            LiSSA and Arnoldi default to :data:`ITERATIVE_CURVATURE`) or ``"ggn"``, the generalised
            Gauss–Newton matrix G = (1/n) Σ Jᵀ(∂²ℓ/∂Φ²)J, positive semi-definite
            for a convex loss, so a non-convex network never stops the solve on
            negative curvature (the backend's ``mean_loss_ggn_vp``).
    """

    def __init__(
        self,
        *,
        damping: float = DEFAULT_DAMPING,
        batch_size: int | None = None,
        curvature: str = "hessian",
    ) -> None:
        check_curvature(curvature)
        self.curvature = curvature
        damping = float(damping)
        if not math.isfinite(damping) or damping < 0:
            raise ValueError(f"damping must be a finite number ≥ 0, got {damping}")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.damping = damping
        self.batch_size = None if batch_size is None else int(batch_size)

    # -- settings -------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """The settings the solver was built with (JSON values), enough to build it again."""
        params = {"damping": self.damping, "batch_size": self.batch_size}
        if self.curvature != "hessian":
            params["curvature"] = self.curvature
        return params

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({settings})"

    # -- fitting --------------------------------------------------------------------
    def fit(self: Solver, model: InfluenceModel, data: Any) -> Solver:
        """Fit on the mean training loss of ``model`` over ``data``; returns the solver."""
        self.model_ = model
        self.data_ = data
        self.parameter_fingerprint_ = parameter_fingerprint(model)
        self.weights_fingerprint_ = weights_fingerprint(model)
        self._data_fingerprint: dict[str, Any] | None = None
        try:
            self._fit(model, data)
        except BaseException:
            del self.model_  # a fit that failed leaves the solver unfitted, not half-fitted
            raise
        return self

    def fitted_for(self: Solver, model: InfluenceModel, data: Any) -> Solver:
        """Fit on ``(model, data)``, or, if already fitted, check it was fitted on exactly them.

        What a calculator does with the solver it is given: an unfitted solver
        is fitted on the calculator's own training data; a fitted one is
        accepted only if its fingerprints (θ and data) match
        (:meth:`check_fitted_for`).
        """
        if self.is_fitted:
            self.check_fitted_for(model, data)
            return self
        return self.fit(model, data)

    def _fit(self, model: InfluenceModel, data: Any) -> None:
        """The solver's own fitting work (factorise, iterate …); nothing for CG and LiSSA."""
        return None

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "model_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(self, "solving needs the Hessian of a model and its data")

    def data_fingerprint_(self) -> dict[str, Any]:
        """The fingerprint of the data the solver was fitted on (computed once, on demand)."""
        self._check_fitted()
        if self._data_fingerprint is None:
            self._data_fingerprint = data_fingerprint(self.model_, self.data_, self.batch_size)
        return self._data_fingerprint

    def check_fitted_for(self, model: InfluenceModel, data: Any) -> None:
        """Refuse to serve a calculator whose θ or training data differ from the fitted ones.

        Raises :class:`~influence_core.errors.FingerprintMismatchError` naming
        what differs: the parameter selection, the parameter values, or the data.
        """
        self._check_fitted()
        where = f"this fitted {type(self).__name__}"
        if list(self.model_.parameter_names) != list(model.parameter_names):
            raise FingerprintMismatchError(
                f"{where} is for parameters {list(self.model_.parameter_names)}, but the "
                f"calculator's model selects {list(model.parameter_names)}; pass an unfitted "
                "solver and the calculator fits it"
            )
        if parameter_fingerprint(model) != self.parameter_fingerprint_:
            raise FingerprintMismatchError(
                f"{where} was fitted at other parameter values (fingerprint mismatch); pass an "
                "unfitted solver and the calculator fits it"
            )
        current = weights_fingerprint(model)
        if (
            None not in (current, self.weights_fingerprint_)
            and current != self.weights_fingerprint_
        ):
            raise FingerprintMismatchError(
                f"{where} was fitted with other weights outside θ (another layer differs, and "
                "H depends on every weight); pass an unfitted solver and the calculator fits it"
            )
        if (
            data is not self.data_
            and data_fingerprint(model, data, self.batch_size) != self.data_fingerprint_()
        ):
            raise FingerprintMismatchError(
                f"{where} was fitted on other training data than the calculator's "
                f"({self.data_fingerprint_()['n']} samples); pass an unfitted solver, or the "
                "same data"
            )

    # -- saving ---------------------------------------------------------------------
    def _fitted_arrays(self) -> dict[str, Array]:
        """The fitted state to save (native arrays by attribute name); none by default."""
        return {}

    def _restore(self, arrays: dict[str, Array]) -> None:
        """Set the fitted attributes from :meth:`_fitted_arrays` output (native arrays)."""
        return None

    def save(self, directory: str | Path) -> Path:
        """Write the fitted state and settings (``arrays.npz`` + ``metadata.json``, no pickle)."""
        self._check_fitted()
        return save_result(
            directory,
            self._fitted_arrays(),
            method=type(self).__name__,
            model=self.model_,
            parameters=self.get_params(),
            data={"train": self.data_},
            batch_size=self.batch_size,
        )

    @classmethod
    def load(
        cls: type[Solver], directory: str | Path, model: InfluenceModel, data: Any = None
    ) -> Solver:
        """A fitted solver from :meth:`save` output, without refitting.

        Refuses (:class:`~influence_core.errors.FingerprintMismatchError`) a
        state fitted for another parameter selection or values of θ, or, when
        ``data`` is given, on other training data. ``data`` is what later
        HVPs (CG, LiSSA) run over; without it only the saved state is usable.
        """
        saved = load_result(
            directory,
            model=model,
            data=None if data is None else {"train": data},
            method=cls.__name__,
        )
        solver = cls(**saved.metadata["parameters"])
        solver.restore_state(model, saved.arrays, data=data)
        solver.parameter_fingerprint_ = saved.metadata["parameter_fingerprint"]
        solver.weights_fingerprint_ = saved.metadata.get("weights_fingerprint")
        solver._data_fingerprint = saved.metadata["data"].get("train")
        return solver

    # -- the fitted state, as NumPy (to save, or to send to another process) ---------
    def fitted_state(self) -> dict[str, Any]:
        """The fitted state as NumPy arrays by name (what :meth:`save` writes), no framework object."""
        self._check_fitted()
        return {
            name: np.asarray(self.model_.to_numpy(value))
            for name, value in self._fitted_arrays().items()
        }

    def restore_state(
        self: Solver, model: InfluenceModel, arrays: dict[str, Any], data: Any = None
    ) -> Solver:
        """This (unfitted) solver, fitted: its state from :meth:`fitted_state` of a solver fitted elsewhere.

        For ``model`` at the same weights as the one it was fitted with (in
        this or another process; the fingerprints are taken from ``model``).
        ``data`` is what later HVPs (CG, LiSSA) run over; without it only the
        fitted state is usable. Returns the solver.
        """
        self.model_ = model
        self.data_ = data
        self.parameter_fingerprint_ = parameter_fingerprint(model)
        self.weights_fingerprint_ = weights_fingerprint(model)
        self._data_fingerprint = None
        native = model.kernels.as_native
        self._restore({name: native(value) for name, value in arrays.items()})
        return self

    # -- what per-point solves cost ---------------------------------------------------
    def samples_per_solve(self) -> int | None:
        """Per-sample HVPs one block solve costs per right-hand side, or ``None`` if it is cheap.

        ``None`` (the default) means a solve is a product with fitted factors
        (exact, Arnoldi, K-FAC): per-point quantities cost about as much as
        scores. An iterative solver (CG, LiSSA) returns its passes × samples.
        """
        return None

    def check_per_point_solves(self, n_points: int | None, what: str) -> None:
        """Refuse up front solving one block per training batch when the estimate is too costly.

        Self-influence and RelatIF solve (H + λI)⁻¹ gᵢ for every training point.
        With an iterative solver that is d × ``n_points`` × :meth:`samples_per_solve`
        multiply-adds (O(n_train × n_fit) HVPs for CG); beyond the solver's
        ``per_point_limit`` this raises :class:`~influence_core.errors.CostLimitError`
        with the estimate and the factored solvers that make it one product per batch.
        """
        samples = self.samples_per_solve()
        limit = getattr(self, "per_point_limit", None)
        if samples is None or limit is None or n_points is None:
            return
        d = self.model_.num_parameters
        work = float(d) * n_points * samples
        if work <= limit:
            return
        raise CostLimitError(
            f"{what} with {type(self).__name__} solves one block per training batch: "
            f"{n_points} right-hand sides × {samples} per-sample HVPs each "
            f"({self._solve_cost_reason()}) at d = {d} ≈ {work:.1e} multiply-adds, over "
            f"this solver's per_point_limit={limit:.1e} (it grows as n_train × n_fit). Fit "
            "EKFACIHVP, KFACIHVP or ArnoldiIHVP instead (one product per batch), or pass "
            "per_point_limit=None to the solver to run it anyway"
        )

    def _solve_cost_reason(self) -> str:
        return "per solve"

    # -- solving --------------------------------------------------------------------
    @property
    def xp(self) -> ArrayNamespace:
        self._check_fitted()
        return self.model_.xp

    def damped_hvp(self, vectors: Array) -> Array:
        """(H + λI) V (or (G + λI) V) over the whole of the fitted data, shape (d, k)."""
        self._check_fitted()
        if self.data_ is None:
            raise ValueError(
                f"this {type(self).__name__} was loaded without its training data; "
                "pass data= to load() to run HVPs"
            )
        return (
            self.model_.curvature_vp(self.data_, vectors, self.curvature, self.batch_size)
            + self.damping * vectors
        )

    def solve(self, vectors: Any) -> Array:
        """(H + λI)⁻¹ V: shape ``(d,)`` for one vector, ``(d, k)`` for a block (solved together)."""
        self._check_fitted()
        xp = self.xp
        v = self.model_.kernels.as_native(vectors, floating=True)
        d = self.model_.num_parameters
        if tuple(v.shape) == (d,):
            return xp.reshape(self._solve_block(xp.reshape(v, (d, 1))), (d,))
        if len(v.shape) != 2 or int(v.shape[0]) != d:
            raise ValueError(f"vectors must have shape ({d},) or ({d}, k), got {tuple(v.shape)}")
        return self._solve_block(v)

    @abstractmethod
    def _solve_block(self, vectors: Array) -> Array:
        """(H + λI)⁻¹ V for a native block V of shape (d, k)."""

    # -- what the influence calculators need ------------------------------------------
    def test_side(self, grads: Array) -> Array:
        """The test block that training gradients meet: here S = (H + λI)⁻¹ Gᵀ, shape (d, b).

        Scores are ``train_side(G_train) @ test_side(G_test)``; a solver with a
        cheaper factorised form (Arnoldi's projection) overrides both.
        """
        self._check_fitted()
        return self._solve_block(self.xp.matrix_transpose(grads))

    def train_side(self, grads: Array) -> Array:
        """What training gradients (b, d) become before meeting :meth:`test_side`: G itself."""
        return grads

    def test_gradients(self, model: InfluenceModel, batch: Any, measurement: Any) -> Array:
        """∇_θ m(z_i) of one test :class:`~influence_core.data.Batch`, (b, d), for :meth:`test_side`.

        The per-sample gradients by default; a layer-wise solver builds them
        from layer statistics instead (no vmap over samples).
        """
        return model.batch_per_sample_grads(batch, measurement)

    def solved_test_side(
        self, model: InfluenceModel, batch: Any, measurement: Any, *, joint: bool = False
    ) -> Array:
        """:meth:`test_side` of one test batch's :meth:`test_gradients`: what the calculators keep.

        A solver that can solve without the batch's (b, d) gradients (layer by
        layer, from statistics) overrides this to keep its peak memory down.
        ``joint=True`` asks for the block as :meth:`TrainingSide.scores_and_quadratic_forms`
        takes it: by default the same block; K-FAC and EK-FAC leave each layer
        in its eigenbasis.
        """
        return self.test_side(self.test_gradients(model, batch, measurement))

    def allocated_test_side(self, n: int) -> Array | None:
        """An (m, n) block that :meth:`solved_test_side_into` fills, or ``None``.

        A calculator keeping n test points' solved block (m × n, d × n for most
        solvers) would otherwise hold every batch's block and their
        concatenation at once: twice the block. A solver that writes its
        batches into one block in place returns it here when the namespace's
        arrays are writeable (``array_api_compat.is_writeable_array``: torch,
        NumPy; not TensorFlow or JAX, which keep the concatenation). By
        default ``None``.
        """
        return None

    def solved_test_side_into(
        self,
        model: InfluenceModel,
        batch: Any,
        measurement: Any,
        out: Array,
        column: int,
        *,
        joint: bool = False,
    ) -> None:
        """Write :meth:`solved_test_side` of ``batch`` into ``out[:, column : column + b]``."""
        solved = self.solved_test_side(model, batch, measurement, joint=joint)
        out[:, column : column + batch.size] = solved

    def training_side(self, model: InfluenceModel, batch: Any) -> TrainingSide:
        """One training :class:`~influence_core.data.Batch` as this solver scores it.

        The default takes the batch's per-sample gradients (b, d); a solver that
        can do without them (layer-wise statistics) overrides this.
        """
        return GradientTrainingSide(self, model.batch_per_sample_grads(batch))

    def quadratic_forms(self, grads: Array) -> Array:
        """gᵢᵀ (H + λI)⁻¹ gᵢ for each row gᵢ of ``grads`` (shape (b, d)): shape (b,).

        The default solves the b right-hand sides as one block; solvers with a
        factorisation override it with something cheaper.
        """
        xp = self.xp
        solved = self._solve_block(xp.matrix_transpose(grads))  # (d, b)
        return xp.sum(grads * xp.matrix_transpose(solved), axis=1)

    def solved_norms(self, grads: Array) -> Array:
        """‖(H + λI)⁻¹ gᵢ‖ for each row of ``grads`` (the RelatIF denominator): shape (b,)."""
        xp = self.xp
        return xp.linalg.vector_norm(self._solve_block(xp.matrix_transpose(grads)), axis=0)


def known_size(model: InfluenceModel, data: Any, batch_size: int | None = None) -> int | None:
    """The samples in ``data`` when known without a pass.

    Exact for ``(X, y)`` arrays and for a list of ``(x, y)`` batches or
    :class:`~influence_core.data.Batch` es (a chunk of a run); otherwise
    batches × batch size, an upper bound.
    """
    if data is None:
        return None
    if isinstance(data, ShardedData):
        return data.num_samples
    if is_array_pair(data):
        return leading_dim(data[1])
    if isinstance(data, list | tuple) and data:
        if all(isinstance(b, Batch) or is_array_pair(b) for b in data):
            return sum(leading_dim(b[1]) for b in data)
    batches = model.num_batches(data, batch_size)
    return None if batches is None else batches * (batch_size or model.batch_size)
