"""Figures the chapters draw that are not tied to one study: adversarial examples beside their perturbations."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def plot_attacks(x: torch.Tensor, y: torch.Tensor, adversarial: Mapping[str, torch.Tensor], predictions: Mapping[str, Sequence[int]],
                 names: Sequence[str], eps: float, clean_predictions: Mapping[str, Sequence[int]] | None = None):
    """A grid with one row per image: the clean image, then for each model the perturbation
    (magnified to fill the colour range: mid-grey is 0, black / white are -eps / +eps) and the
    adversarial image, titled with the model's prediction. Returns the matplotlib figure.

    Args:
        x: clean images (N, C, H, W) in [0, 1]; y: labels (N,).
        adversarial: model label -> adversarial images for that model (N, C, H, W).
        predictions: model label -> predicted classes on the adversarial images.
        names: class names. eps: the attack's l_inf radius (pixel units).
        clean_predictions: model label -> predicted classes on the clean images (shown under the clean image).
    """
    import matplotlib.pyplot as plt

    n, labels = len(x), list(adversarial)
    fig, axes = plt.subplots(n, 1 + 2 * len(labels), figsize=(1.9 * (1 + 2 * len(labels)), 2.0 * n), squeeze=False)

    def show(ax, img, title, color="black", cmap="gray", vmin=0.0, vmax=1.0):
        img = img.detach().cpu()
        ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap=cmap if img.shape[0] == 1 else None, vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=8, color=color)
        ax.set_xticks([])
        ax.set_yticks([])

    for i in range(n):
        truth = names[int(y[i])]
        clean_note = ""
        if clean_predictions:
            clean_note = "\n" + ", ".join(f"{k}: {names[int(p[i])]}" for k, p in clean_predictions.items())
        show(axes[i, 0], x[i], f"clean: {truth}{clean_note}")
        for j, label in enumerate(labels):
            delta = (adversarial[label][i].cpu() - x[i].cpu()) / (2 * eps) + 0.5  # [-eps, eps] -> [0, 1]
            show(axes[i, 1 + 2 * j], delta, f"perturbation ({label})")
            pred = int(predictions[label][i])
            show(axes[i, 2 + 2 * j], adversarial[label][i], f"{label} says: {names[pred]}", color="tab:green" if pred == int(y[i]) else "tab:red")
    fig.tight_layout()
    return fig
