"""The report's figures (matplotlib, Agg backend: files only), each written atomically as PNG.

- ``dice_per_round.png``: every federated cell's mean global-model validation Dice per round;
- ``dice_vs_bytes.png``: final test Dice against the bytes one site sent per round (log x), one
  point per federated cell: FLAP-SAM's Figure 1 trade-off between accuracy and communication;
- ``qualitative_<SITE>.png``: a few test slices of the site (rows): the image with the label
  outline, then each cell's prediction outline over the image (label outline faint). The slices
  are those each cell process saved (``qualitative/<SITE>.npz``: the largest label areas).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedfms.io import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    _pyplot().close(figure)


def _federated(results: Sequence[dict]) -> list[dict]:
    return [r for r in results if r.get("status") == "ok" and r["cell"]["setting"] in ("federated", "loso")]


def dice_per_round(results: Sequence[dict], path: Path) -> Path | None:
    """Mean validation Dice of the global model per round, one line per federated cell; None when there is none."""
    cells = [r for r in _federated(results) if r.get("rounds")]
    if not cells:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for r in cells:
        points = [(p["round"], p["mean_global_val_dice"]) for p in r["rounds"]]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=r["cell"]["id"])
    axis.set(xlabel="round (0: the initial global model)", ylabel="mean validation Dice of the global model\n(slices with organ)", ylim=(0, 1))
    axis.legend(fontsize="small")
    _save(figure, path)
    return path


def dice_vs_bytes(results: Sequence[dict], path: Path, metric: str = "dice_3d") -> Path | None:
    """Final test ``metric`` (mean over sites) against bytes per round, log x; None without a federated cell to plot."""
    cells = [r for r in _federated(results) if _sent(r) and r["average"].get(metric) is not None]
    if not cells:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for r in cells:
        axis.scatter(_sent(r), r["average"][metric])
        axis.annotate(r["cell"]["id"], (_sent(r), r["average"][metric]), fontsize="small", xytext=(4, 4), textcoords="offset points")
    axis.set_xscale("log")
    axis.set(xlabel="bytes one site sends per round, measured on the wire where recorded (log scale)", ylabel=f"final test {metric}\n(mean over sites, empty-slice rule)", ylim=(0, 1))
    _save(figure, path)
    return path


def _sent(result: dict) -> float | None:
    """Bytes one site sent per round: measured on the wire (compression included) when recorded, else counted."""
    return result.get("wire_bytes_up_per_round") or result.get("bytes_per_round")


def _outline(axis, mask: np.ndarray, shape: tuple[int, int], color: str, alpha: float = 1.0) -> None:
    """The outline of ``mask`` drawn on an image of ``shape`` (the mask may be at another resolution).

    The mask is padded with background, so a prediction that fills the slice is outlined along its border.
    """
    if not mask.any():
        return
    height, width = mask.shape
    ys = (np.arange(-1, height + 1) + 0.5) * shape[0] / height - 0.5
    xs = (np.arange(-1, width + 1) + 0.5) * shape[1] / width - 0.5
    axis.contour(xs, ys, np.pad(mask.astype(float), 1), levels=[0.5], colors=color, linewidths=1.2, alpha=alpha)


def qualitative_sites(results: Sequence[dict]) -> list[str]:
    return sorted({site for r in results if r.get("status") == "ok" for site in (r.get("qualitative") or {})})


def qualitative(results: Sequence[dict], experiment_dir: Path, site: str, path: Path) -> Path | None:
    """The site's saved test slices (rows) x the image with its label, then each cell's prediction (columns)."""
    saved = []
    for r in results:
        relative = (r.get("qualitative") or {}).get(site) if r.get("status") == "ok" else None
        file = experiment_dir / "cells" / r["cell"]["id"] / relative if relative else None
        if file and file.is_file():
            with np.load(file) as arrays:
                saved.append((r["cell"]["id"], {k: arrays[k] for k in arrays.files}))
    if not saved:
        return None
    reference = saved[0][1]
    keys = [(str(c), int(s)) for c, s in zip(reference["case"], reference["slice"])]
    plt = _pyplot()
    figure, axes = plt.subplots(len(keys), len(saved) + 1, figsize=(max(5.0, 2.1 * (len(saved) + 1)), 2.2 * len(keys) + 0.4), squeeze=False)
    for row, key in enumerate(keys):
        image, label = reference["image"][row], reference["label"][row]
        _panel(axes[row][0], image, [(label, "lime", 1.0)], f"{key[0]} slice {key[1]}\nimage, label")
        for column, (cell, arrays) in enumerate(saved, start=1):
            found = [n for n, k in enumerate(zip(arrays["case"], arrays["slice"])) if (str(k[0]), int(k[1])) == key]
            outlines = [(label, "lime", 0.4)] + ([(arrays["prediction"][found[0]], "red", 1.0)] if found else [])
            _panel(axes[row][column], image, outlines, cell if row == 0 else "", missing=not found)
    figure.suptitle(f"{site}: label (green), prediction (red)\ntest slices with the largest label area", fontsize="small")
    _save(figure, path)
    return path


def _panel(axis, image: np.ndarray, outlines: list[tuple[np.ndarray, str, float]], title: str, missing: bool = False) -> None:
    axis.imshow(image, cmap="gray")
    for mask, color, alpha in outlines:
        _outline(axis, mask, image.shape, color, alpha)
    if missing:
        axis.text(0.5, 0.5, "not predicted\nby this cell", color="yellow", ha="center", va="center", transform=axis.transAxes, fontsize="small")
    axis.set_title(title, fontsize=7)
    axis.axis("off")


def write_figures(results: Sequence[dict], experiment_dir: Path, folder: Path) -> list[Path]:
    """Every figure the results allow; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [dice_per_round(results, folder / "dice_per_round.png"), dice_vs_bytes(results, folder / "dice_vs_bytes.png")]
    written += [qualitative(results, experiment_dir, site, folder / f"qualitative_{site}.png") for site in qualitative_sites(results)]
    return [p for p in written if p is not None]
