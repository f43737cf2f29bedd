"""The demo's figures (matplotlib, PNG): detection curves and a test digit's proponents/opponents."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def detection_curves(scores: dict[str, np.ndarray], positives: np.ndarray, path: Path) -> Path:
    """Fraction of the positives found against the fraction of the data checked, per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 5.2))
    checked = np.arange(1, len(positives) + 1) / len(positives)
    shown = checked <= 0.3  # where the methods differ
    styles = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    for i, (name, values) in enumerate(scores.items()):
        order = np.argsort(-values, kind="stable")
        found = np.cumsum(positives[order]) / positives.sum()
        baseline = "baseline" in name
        ax.plot(
            checked[shown],
            found[shown],
            label=name,
            color="0.45" if baseline else f"C{i}",
            linestyle=":" if baseline else styles[i % len(styles)],
            marker=markers[i % len(markers)],
            markevery=(i * 5 % 30 + 10, 40),  # staggered, so overlapping curves stay apart
            markersize=4,
            linewidth=1.4,
            zorder=3,
        )
    ax.set_xlabel("fraction of training data checked (highest score first)")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_xlim(0, 0.3)
    ax.set_ylim(0, 1.05)  # a curve at 100 % stays inside the frame
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.text(
        0.01,
        0.005,
        "Score: self-influence score(z, z) ≥ 0, how much the model relies on z to fit z itself "
        "(influence: g(z)ᵀ(H+λI)⁻¹g(z);\nTracIn: Σ η‖g‖²; representers: α·‖f‖²). Flipped labels "
        "score high. Baselines: the training loss, and a random order.",
        fontsize=7,
        va="bottom",
    )
    fig.subplots_adjust(left=0.1, right=0.98, top=0.97, bottom=0.2)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def proponents_grid(
    data: dict[str, np.ndarray], index: int, predicted: int, top: dict[str, np.ndarray], path: Path
) -> Path:
    """The test digit, then its top proponents (row 1) and opponents (row 2), labels and scores."""
    plt = _pyplot()
    k = top["proponents"].shape[1]
    fig, axes = plt.subplots(2, k + 1, figsize=(1.6 * (k + 1), 4.6))
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].imshow(data["X_test"][index].reshape(8, 8), cmap="gray_r")
    axes[0, 0].set_title(
        f"test #{index}\nlabel {data['y_test'][index]}, pred. {predicted}", fontsize=8
    )
    for row, kind in enumerate(("proponent", "opponent")):
        for j in range(k):
            i = int(top[f"{kind}s"][0, j])
            ax = axes[row, j + 1]
            ax.imshow(data["X_train"][i].reshape(8, 8), cmap="gray_r")
            flipped = " (flipped)" if data["flipped"][i] else ""
            ax.set_title(
                f"{kind} #{i}\nlabel {data['y_train'][i]}{flipped}\n{top[f'{kind}_scores'][0, j]:+.3g}",
                fontsize=7,
            )
    fig.text(
        0.01,
        0.01,
        "Row 1: proponents (score > 0: removing the point would raise this test digit's loss "
        "by about score/n). Row 2: opponents\n(score < 0: removing it would lower the loss). "
        "Scores: g(test)ᵀ(H+λI)⁻¹g(train) on the last layer, n = 1200 training digits.",
        fontsize=7,
        va="bottom",
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
