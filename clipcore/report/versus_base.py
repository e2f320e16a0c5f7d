"""Did fine-tuning beat the base? The val-picked epoch against epoch 0 (the untouched base), paired
over the val queries: each query's competition points under both models (the train stage keeps
them in val_query_scores.json), and a bootstrap interval of the mean gain.

Pairing removes what both models share (how hard each query is), so the interval is far tighter
than two separate ones. A gain whose interval reaches 0 is not told from noise: the plain line
then says the base may be as good, so that nobody takes repository/best for an improvement it
is not (a fine-tuned model can score below its base on a crowded test gallery).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clipcore import paths
from clipcore.errors import ClipcoreError

RESAMPLES = 2000
SEED = 0  # a fixed bootstrap: the same files give the same interval


def paired_gain(base: np.ndarray, picked: np.ndarray, resamples: int = RESAMPLES
                ) -> tuple[float, float, float]:
    """Mean of picked - base over the queries and its 95% percentile bootstrap interval."""
    gains = np.asarray(picked, float) - np.asarray(base, float)
    if gains.ndim != 1 or len(gains) == 0:
        raise ClipcoreError("the base comparison needs each val query's points under both models")
    rng = np.random.default_rng(SEED)
    means = gains[rng.integers(0, len(gains), (resamples, len(gains)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(gains.mean()), float(low), float(high)


def compare_with_base(epoch: int, path: Path = paths.VAL_QUERY_SCORES) -> dict | None:
    """The summary's `versus_base` entry for the picked epoch, None when the train stage kept no
    per-query val points (no val queries, or a run made before they were kept)."""
    try:
        by_epoch = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ClipcoreError(f"{path}: not JSON ({exc}); run `dvc repro train`") from None
    if "0" not in by_epoch or str(epoch) not in by_epoch:
        return None
    base, picked = by_epoch["0"], by_epoch[str(epoch)]
    if len(base) != len(picked):
        raise ClipcoreError(f"{path}: epoch 0 and epoch {epoch} scored different val queries "
                            f"({len(base)}, {len(picked)}); run `dvc repro train`")
    gain, low, high = paired_gain(np.array(base), np.array(picked))
    return {"epoch": epoch, "queries": len(base), "base_score": float(np.mean(base)),
            "picked_score": float(np.mean(picked)), "gain": gain, "gain_ci95": [low, high],
            "beats_base": bool(epoch != 0 and low > 0)}


def verdict(versus: dict | None) -> str:
    """One plain line on whether the picked model beats the base beyond noise."""
    if versus is None:
        return "no per-query val points: fine-tuning not compared with the base"
    if versus["epoch"] == 0:
        return ("validation picked epoch 0: fine-tuning did not beat the base; repository/best "
                "holds the base model")
    low, high = versus["gain_ci95"]
    measured = (f"val {versus['picked_score']:.1f} at epoch {versus['epoch']} against "
                f"{versus['base_score']:.1f} at epoch 0, gain {versus['gain']:+.1f} "
                f"(95% interval {low:+.1f} to {high:+.1f}, paired over {versus['queries']} "
                f"val queries)")
    if versus["beats_base"]:
        return f"fine-tuning beat the base: {measured}"
    return (f"fine-tuning did not beat the base beyond noise: {measured}; the base "
            f"({paths.model_path(0)}) may be as good")
