"""K-FAC and EK-FAC against leave-one-out retraining and exact influence on the convex digits problem.

    .venv/bin/python benchmarks/ekfac_loo.py

Softmax regression on digits (tests/digits_problem.py: n = 1000, L2 μ = 1e-2,
trained to convergence), torch: the predicted loss change of removing each of
the exact solver's 20 most influential training points for 3 test points,
against the change measured by retraining without it, and the Pearson
correlation of all scores with the exact solver's.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import numpy as np
from digits_problem import MU, N_TRAIN, actual_change, digits_model, problem
from scipy.stats import pearsonr

from influence_core import (
    EKFACIHVP,
    KFACIHVP,
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    set_progress,
)

set_progress(False)
p = problem()
model = digits_model("torch")
train = (p["X"], p["y"])
test = (p["X_test"], p["y_test"])
exact = model.to_numpy(
    FirstOrderInfluenceCalculator(model, ExactIHVP(damping=MU)).fit(train).influence(test)
)
for name, solver in (
    ("EK-FAC true", EKFACIHVP(damping=MU)),
    ("EK-FAC empirical", EKFACIHVP(damping=MU, fisher="empirical")),
    ("K-FAC true", KFACIHVP(damping=MU)),
):
    scores = model.to_numpy(FirstOrderInfluenceCalculator(model, solver).fit(train).influence(test))
    predicted, actual = [], []
    for t in range(3):
        for i in np.argsort(-np.abs(exact[t]), kind="stable")[:20]:
            predicted.append(scores[t, i] / N_TRAIN)
            actual.append(actual_change(int(i))[t])
    r = pearsonr(predicted, actual).statistic
    agree = np.corrcoef(scores.ravel(), exact.ravel())[0, 1]
    print(
        f"{name}: LOO Pearson {r:.4f} over {len(actual)} removals (the exact solver's 60 most influential), Pearson with exact influence {agree:.4f}"
    )
