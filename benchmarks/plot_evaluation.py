"""Faithfulness against cost, from ``evaluation_digits.py``'s rows: the figure of docs/choosing.md.

    .venv/bin/python benchmarks/plot_evaluation.py [benchmarks/results/evaluation_digits.json]
        [--out docs/images/estimators.png]

One panel per model: LDS (± its 95 % interval) against the seconds of fit +
scores (log scale), ours as circles, dattri's and traker's as squares.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rows", nargs="?", default=str(HERE / "results" / "evaluation_digits.json"))
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "images" / "estimators.png"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in json.loads(Path(args.rows).read_text()) if "lds" in r]
    # dattri's TRAK comes out with the opposite sign (see evaluation_digits.py): plot it negated.
    rows = [
        r for r in rows if not r["method"].startswith("dattri TRAK") or "negated" in r["method"]
    ]
    models = sorted({r["model"] for r in rows}, key=["softmax", "mlp"].index)
    titles = {
        "softmax": "digits, softmax regression (d = 650)",
        "mlp": "digits, MLP 64-32-10 (d = 2410)",
    }
    figure, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    for axis, name in zip(axes[0], models, strict=True):
        for row in (r for r in rows if r["model"] == name):
            ours = row["library"] == "influence_core"
            axis.errorbar(
                row["seconds"],
                row["lds"],
                yerr=row["lds_interval"],
                fmt="o" if ours else "s",
                color="tab:blue" if ours else "tab:orange",
                capsize=3,
            )
            axis.annotate(
                row["method"].split(" (")[0].replace(", negated", " (−)"),
                (row["seconds"], row["lds"]),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
        axis.set_xscale("log")
        axis.set_xlabel("fit + scores, seconds (2 CPU cores)")
        axis.set_ylabel("LDS (mean Spearman, ± 95 %)")
        axis.set_title(titles.get(name, name))
        axis.grid(alpha=0.3)
    axes[0][0].plot([], [], "o", color="tab:blue", label="influence_core")
    axes[0][0].plot([], [], "s", color="tab:orange", label="dattri / traker")
    axes[0][0].legend(loc="lower right")
    figure.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
