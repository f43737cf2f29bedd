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
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    checked = np.arange(1, len(positives) + 1) / len(positives)
    for name, values in scores.items():
        order = np.argsort(-values, kind="stable")
        found = np.cumsum(positives[order]) / positives.sum()
        ax.plot(checked, found, label=name, linestyle="--" if "baseline" in name else "-")
    ax.set_xlabel("fraction of training data checked (highest self-influence first)")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_xlim(0, 0.5)
    ax.set_ylim(0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
