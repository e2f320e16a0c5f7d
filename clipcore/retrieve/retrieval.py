"""The retrieve stage: rank the gallery for every query with each epoch's embeddings, write
the rankings in the competition's format and, where the test labels are known, measure them.
"""
from __future__ import annotations

import csv
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from clipcore import paths
from clipcore.data.manifests import labels_by_name, read_manifest
from clipcore.errors import ClipcoreError
from clipcore.files import write_text_atomic
from clipcore.params import RetrieveParams
from clipcore.ranking.measures import metrics_for_indices
from clipcore.ranking.search import index_spec, top_k
from clipcore.retrieve.pictures import draw_grid, picture_rows
from clipcore.retrieve.rerank import check_memory, ranked

SPLITS = ("query", "gallery")
CSV_COLUMNS = ("epoch", "score", "top1", "top5", "top10", "precision_at_k", "map_at_k")


@dataclass(frozen=True)
class Embeddings:
    query: np.ndarray
    gallery: np.ndarray
    query_names: np.ndarray
    gallery_names: np.ndarray


@dataclass(frozen=True)
class Split:
    """One manifest as the stage needs it: file paths, base names, labels (None: unknown)."""
    paths: list[Path]
    names: list[str]
    labels: np.ndarray | None


@dataclass(frozen=True)
class RetrieveReport:
    results: list[Path]          # one results file per epoch, by epoch
    metrics: dict[int, dict]     # per epoch; empty when the labels are unknown
    best_epoch: int | None

    def summary(self) -> str:
        done = f"wrote {len(self.results)} result files to {paths.RESULTS}"
        if self.best_epoch is None:
            return f"{done}; test labels unknown, so no retrieval metrics"
        best = self.metrics[self.best_epoch]
        # Picked by the test labels: an upper bound, not a model to keep (that is the best
        # stage's val-picked epoch).
        return (f"{done}; highest test score at epoch {self.best_epoch}: "
                f"{best['score']:.1f}/1000, top-1 {best['top1']:.3f}, "
                f"mAP@{best['k']} {best['map_at_k']:.3f} (an upper bound: the test labels "
                f"picked it; the val-picked model goes to {paths.BEST})")


def retrieve_all(params: RetrieveParams, data_root: Path,
                 prepared: Path = paths.PREPARED) -> RetrieveReport:
    """Results (and metrics, pictures) for every `embeddings/epoch_X.npz`, by epoch.

    Every epoch is searched before any output is written: a bad file stops the run with the
    previous run's outputs untouched.
    """
    files = paths.epoch_files(paths.EMBEDDINGS, "epoch_*.npz")
    if not files:
        raise ClipcoreError(f"{paths.EMBEDDINGS}: no epoch_*.npz files (run `dvc repro embed`)")
    _check_every_model_embedded(files)
    query, gallery = (_split(read_manifest(prepared, split), data_root) for split in SPLITS)
    check_memory(params, len(query.names), len(gallery.names))
    rankings = {}
    with tqdm(files, desc="retrieve", unit="epoch") as bar:  # closed on error too: clean stderr
        for file in bar:
            rankings[paths.epoch_of(file)] = _search(file, query, gallery, params, prepared)
    labelled = query.labels is not None and gallery.labels is not None
    metrics = {epoch: metrics_for_indices(query.labels, gallery.labels, indices, k=params.top_k)
               for epoch, indices in rankings.items()} if labelled else {}

    written, pictures = [], []
    for epoch, indices in rankings.items():
        ranking = {q: [gallery.names[i] for i in row] for q, row in zip(query.names, indices)}
        written.append(_write_json(paths.results_path(epoch), ranking, indent=1))
        if params.picture_queries:
            rows = picture_rows(len(indices), params.picture_queries)
            hits = gallery.labels[indices[rows]] == query.labels[rows, None] if labelled else None
            draw_grid(paths.picture_path(epoch), _caption(epoch, metrics.get(epoch)),
                      [query.paths[r] for r in rows],
                      [[gallery.paths[i] for i in indices[r]] for r in rows], hits)
            pictures.append(paths.picture_path(epoch))
    _remove_old_outputs(keep={*written, *pictures})
    best = max(metrics, key=lambda e: (metrics[e]["score"], -e)) if metrics else None
    write_metrics(metrics, best)
    return RetrieveReport(written, metrics, best)


def _search(file: Path, query: Split, gallery: Split, params: RetrieveParams,
            prepared: Path) -> np.ndarray:
    """One epoch's ranking: (queries, top_k) gallery indices, best first."""
    embeddings = load_embeddings(file)
    check_names(embeddings, {"query": query, "gallery": gallery}, file, prepared)
    try:
        # Re-ranking (retrieve.rerank, dba_k) runs around this search; none: the search alone.
        return ranked(embeddings.query, embeddings.gallery, params,
                      search=lambda q, g, k: top_k(q, g, k, params.metric,
                                                   index=index_spec(params)))
    except ClipcoreError as exc:
        raise ClipcoreError(f"{file}: {exc}") from None


def _check_every_model_embedded(files: list[Path]) -> None:
    """An interrupted embed leaves the first epochs' files only: results for them alone would
    pass for the whole run. (Without model files, embeddings copied alone, nothing to compare.)"""
    models = [paths.epoch_of(f) for f in paths.epoch_files(paths.ALL_WEIGHTS, "model_epoch_*.pt")]
    missing = sorted(set(models) - {paths.epoch_of(f) for f in files})
    if missing:
        raise ClipcoreError(
            f"{paths.EMBEDDINGS}: no embeddings for epoch{'s' if len(missing) > 1 else ''} "
            f"{', '.join(map(str, missing))} of the {len(models)} model files in "
            f"{paths.ALL_WEIGHTS} (an interrupted embed?); run `dvc repro embed`")


def load_embeddings(path: Path) -> Embeddings:
    """An embeddings file in the embed stage's format, checked for shape and names."""
    keys = list(Embeddings.__dataclass_fields__)
    try:
        data = np.load(path, allow_pickle=False)  # no pickles: names are plain unicode arrays
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # EOF: empty; zip: cut short
        raise ClipcoreError(f"{path}: not a readable embeddings file ({exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ClipcoreError(f"{path}: a single array, not an embeddings archive with {keys}")
    with data:
        missing = [key for key in keys if key not in data]
        if missing:
            raise ClipcoreError(f"{path}: no {', '.join(missing)} array (run `dvc repro embed`)")
        try:
            embeddings = Embeddings(**{key: data[key] for key in keys})
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise ClipcoreError(f"{path}: not a readable embeddings file ({exc})") from None
    for split in SPLITS:
        vectors, names = getattr(embeddings, split), getattr(embeddings, f"{split}_names")
        if vectors.ndim != 2 or names.ndim != 1 or len(vectors) != len(names):
            raise ClipcoreError(f"{path}: {split} holds shape {vectors.shape} for "
                                f"{names.shape} names; expected one row per name")
    return embeddings


def check_names(embeddings: Embeddings, splits: dict[str, Split], path: Path,
                prepared: Path) -> None:
    """The file names in the embeddings must be the manifests' names, in manifest order."""
    for split in SPLITS:
        names = [str(n) for n in getattr(embeddings, f"{split}_names")]
        if names != splits[split].names:
            raise ClipcoreError(f"{path}: {split} names differ from {Path(prepared) / split}.csv "
                                f"(stale embeddings: run `dvc repro embed`)")


def write_metrics(metrics: dict[int, dict], best: int | None) -> None:
    """retrieval.json (per epoch, and the epoch of the highest test score as `best_on_test`: an
    upper bound, never a choice) and the per-epoch CSV for the plots."""
    if best is None:
        summary = {"epochs": {}, "labels": "unknown"}
    else:
        summary = {"epochs": {str(e): m for e, m in metrics.items()},
                   "best_on_test": {"epoch": best, **metrics[best]}}
    _write_json(paths.RETRIEVAL_METRICS, summary, indent=2)
    table = io.StringIO(newline="")
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for epoch, m in metrics.items():
        writer.writerow([epoch, *(m[c] for c in CSV_COLUMNS[1:])])
    write_text_atomic(paths.RETRIEVAL_PLOT, table.getvalue())


def _caption(epoch: int, metrics: dict | None) -> str:
    if metrics is None:
        return f"epoch {epoch} (test labels unknown)"
    return (f"epoch {epoch}: score {metrics['score']:.1f}/1000, top-1 {metrics['top1']:.2f}, "
            f"top-5 {metrics['top5']:.2f}, top-10 {metrics['top10']:.2f}")


def _split(frame, data_root: Path) -> Split:
    labels = labels_by_name(frame)
    names = [PurePosixPath(p).name for p in frame["path"]]
    return Split(paths=[Path(data_root) / p for p in frame["path"]], names=names,
                 labels=None if labels is None else np.array([labels[n] for n in names]))


def _remove_old_outputs(keep: set[Path]) -> None:
    """A direct run must not leave an earlier run's epochs behind (dvc repro deletes outs);
    called once the new files exist, so a run that fails keeps the earlier ones."""
    for old in [*paths.RESULTS.glob("retrieval_results_epoch_*.json"),
                *paths.PICTURES.glob("epoch_*.png")]:
        if old not in keep:
            old.unlink()


def _write_json(path: Path, content, indent: int) -> Path:
    return write_text_atomic(path, json.dumps(content, indent=indent, ensure_ascii=False) + "\n")
