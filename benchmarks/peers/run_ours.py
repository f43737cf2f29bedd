"""influence_core on one workload (project venv): ``run_ours.py WORKLOAD BACKEND [REPEATS]``."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import (
    ARNOLDI_ITERATIONS,
    ARNOLDI_RANK,
    CG_ITERATIONS,
    CHECKPOINT_RATE,
    DAMPING,
    LISSA_DEPTH,
    LISSA_SCALE,
    TOP_K,
    WORKLOADS,
    is_conv,
    load_setup,
    timed,
    unflatten,
    write,
)

from influence_conformance.specs import Conv2D, Dense, Flatten, ModelSpec
from influence_core import (
    ArnoldiIHVP,
    ArnoldiInfluenceCalculator,
    ConjugateGradientIHVP,
    ConvergenceWarning,
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    LissaIHVP,
    TracIn,
    get_registry,
)
from influence_core.app.demo import SPEC

CONV_SPEC = ModelSpec(
    "digits_conv",
    (8, 8, 1),
    (Conv2D(8, 3, "relu"), Flatten(), Dense(10)),
    "cross_entropy",
    "finite_differences",
)


#: The iterative solvers' HVP passes take the training set as one batch, as the limit rows and
#: dattri do (HVPs hold no per-sample gradients; in torch.func each call costs ~1 ms of
#: fixed overhead, so batches of 256 make Arnoldi 2.6x slower on this small model).
#: Per-sample gradients, and the exact Hessian's blocks, stream in batches of 256.
HVP_BATCH = 1200


def models(workload: str, backend: str) -> tuple[dict, Any, InfluenceModel, InfluenceModel]:
    """The workload's setup, reference model, InfluenceModel over every parameter, and over θ."""
    s = load_setup(workload)
    reference = (
        get_registry()
        .by_name(backend)
        .load_reference_models()(
            CONV_SPEC if is_conv(workload) else SPEC, unflatten(s["theta"]), "float64"
        )
    )
    full = InfluenceModel(reference.model, reference.loss_fn, batch_size=256)
    model = (
        full.with_parameters(full.last_layer().name) if WORKLOADS[workload][1] == "last" else full
    )
    return s, reference, full, model


def checkpoint_states(s: dict, reference: Any, full: InfluenceModel) -> list[Any]:
    """The setup's TracIn checkpoints as the backend's own saved states."""
    states = []
    for theta in s["checkpoints"]:
        with full.parameters_set_to(reference.from_canonical(theta)):
            states.append(full.kernels.save_state())
    return states


def main(workload: str, backend: str, repeats: int) -> None:
    s, reference, full, model = models(workload, backend)
    train, test = (s["X_train"], s["y_train"]), (s["X_test"], s["y_test"])
    host = model.to_numpy

    def both(calc) -> dict:  # one training-gradient pass for the two results (the peers make two)
        scores, self_influence = calc.influence_and_self_influence(test)
        return {"scores": host(scores), "self": host(self_influence)}

    def exact():
        return both(FirstOrderInfluenceCalculator(model, ExactIHVP(damping=DAMPING)).fit(train))

    def cg():
        ihvp = ConjugateGradientIHVP(
            damping=DAMPING, tol=0.0, maxiter=CG_ITERATIONS, batch_size=HVP_BATCH
        )
        return {
            "scores": host(FirstOrderInfluenceCalculator(model, ihvp).fit(train).influence(test))
        }

    def lissa():
        ihvp = LissaIHVP(
            damping=DAMPING, batch_size=len(train[1]), scale=LISSA_SCALE, depth=LISSA_DEPTH
        )
        return {
            "scores": host(FirstOrderInfluenceCalculator(model, ihvp).fit(train).influence(test))
        }

    def grads():
        xp = model.xp
        return {
            "grads": host(xp.concat([g for _, g in model.iter_per_sample_grads(train)], axis=0))
        }

    def topk():
        calc = FirstOrderInfluenceCalculator(model, ExactIHVP(damping=DAMPING)).fit(train)
        found = calc.top_k(test, k=TOP_K)
        return {"indices": host(found.proponents), "topk": host(found.proponent_scores)}

    def arnoldi():
        calc = ArnoldiInfluenceCalculator(
            model,
            ArnoldiIHVP(
                rank=ARNOLDI_RANK,
                iterations=ARNOLDI_ITERATIONS,
                damping=DAMPING,
                batch_size=HVP_BATCH,
            ),
            batch_size=HVP_BATCH,
        ).fit(train)
        return both(calc)

    checkpoints = checkpoint_states(s, reference, full)

    def tracin():
        return both(TracIn(model, checkpoints, CHECKPOINT_RATE).fit(train))

    run = {
        "grads": grads,
        "exact": exact,
        "cg": cg,
        "lissa": lissa,
        "arnoldi": arnoldi,
        "tracin": tracin,
        "topk": topk,
    }[workload.split("_")[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        times, scores = timed(run, repeats)
    write("influence_core", backend, workload, times, scores)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 3)
