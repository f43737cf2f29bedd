"""A chunked self-influence run, slowed down so a test can kill it partway (run as a script).

python tests/resumable_run.py OUT_DIR BACKEND SLEEP_SECONDS
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from digits_problem import MU, digits_model, problem

from influence_core import ExactIHVP, FirstOrderInfluenceCalculator, run_self_influence


class SlowCalculator(FirstOrderInfluenceCalculator):
    def self_influence(self, train_data=None):
        time.sleep(SLEEP)
        return super().self_influence(train_data)


def main(out: str, backend: str) -> None:
    p = problem()
    model = digits_model(backend, batch_size=50)
    train = (p["X"], p["y"])
    calculator = SlowCalculator(model, ExactIHVP(damping=MU), batch_size=50).fit(train)
    run_self_influence(calculator, out, chunk_size=100)


if __name__ == "__main__":
    SLEEP = float(sys.argv[3])
    main(sys.argv[1], sys.argv[2])
