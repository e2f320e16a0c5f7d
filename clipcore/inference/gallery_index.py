"""A gallery index: a folder of images embedded once by a trained model, searched by later
queries. The folder holds the embeddings (embeddings.npy, float32 unit rows), the image names
(names.json: paths relative to the indexed folder, sorted), the FAISS index of the run's
`retrieve.index` kind (index.faiss: flat, IVF or HNSW, over unit rows for cosine; other
programs can `faiss.read_index` it) and manifest.json, written last: the model file's sha256,
the embed and retrieve params and the face crop the images were embedded with. A query embedded by any other model file is refused: its
vectors would live in another space and rank nonsense without an error.

A build embeds in chunks of CHUNK images, each saved under partial/ as it is done: a rerun after
an interruption (Ctrl-C, a lost machine) embeds only the chunks that are missing, as long as the
model file, its embed settings and the folder's image names are the same.

Searching runs retrieve's own ranking (clipcore.retrieve.rerank.ranked over
clipcore.ranking.search.top_k), so the same model, params and images give retrieve's results.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from clipcore.data.images import IMAGE_SUFFIXES
from clipcore.data.manifests import folder_files
from clipcore.errors import ClipcoreError
from clipcore.files import write_atomic, write_text_atomic
from clipcore.inference.loading import TrainedModel
from clipcore.params import RetrieveParams
from clipcore.params_parsing import build
from clipcore.ranking import ann
from clipcore.ranking.search import index_spec, top_k, unit_rows
from clipcore.retrieve.rerank import ranked

FORMAT = "clipcore-gallery-index/1"
EMBEDDINGS, NAMES, INDEX, MANIFEST = "embeddings.npy", "names.json", "index.faiss", "manifest.json"
PARTIAL = "partial"
CHUNK = 2048  # images per saved chunk: a lost build costs at most this many again


@dataclass
class GalleryIndex:
    folder: Path
    images: Path                  # the folder the names are relative to
    names: list[str]
    embeddings: np.ndarray
    retrieve: RetrieveParams      # what the index was built for
    manifest: dict
    built: faiss.Index | None     # the approximate index (None: exact search on the rows)

    def check_model(self, trained: TrainedModel) -> None:
        if trained.sha256 != self.manifest["model_sha256"]:
            raise ClipcoreError(
                f"{self.folder}: indexed with model file sha256 {self.manifest['model_sha256'][:12]} "
                f"({self.manifest['model']}), not {trained.file} (sha256 {trained.sha256[:12]}): "
                f"its vectors are from another model; rebuild the index with `python -m "
                f"clipcore.index --model {trained.file}`")

        # An index from before crops were recorded has none: its model file's setting applies.
        indexed = self.manifest.get("crop", _crop_record(trained))
        if indexed != _crop_record(trained):
            raise ClipcoreError(f"{self.folder}: gallery indexed with {indexed}, but the queries "
                                f"would be embedded with {_crop_record(trained)} "
                                f"({trained.crop.source}): rebuild the index")

    def search(self, query: np.ndarray, params: RetrieveParams | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(indices, scores), each (Q, top_k), best first, ranked as retrieve ranks with `params`
        (default: the index's own); scores: cosine similarity, or L2 distance for euclidean."""
        params = params or self.retrieve
        if (params.metric, params.index) != (self.retrieve.metric, self.retrieve.index):
            raise ClipcoreError(f"{self.folder}: built for {self.retrieve.metric} / "
                                f"{self.retrieve.index} search, asked for {params.metric} / "
                                f"{params.index}")
        if not 1 <= params.top_k <= len(self.names):
            raise ClipcoreError(f"k={params.top_k} must be between 1 and the gallery size "
                                f"({len(self.names)} images)")

        def search(q: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:
            # The saved index serves the gallery as indexed; DBA's smoothed gallery is searched
            # as retrieve searches it (an index built for it on the spot).
            saved = self.built if g is self.embeddings and self.built is not None else None
            return top_k(q, g, k, params.metric, index=index_spec(params) if saved is None else saved)

        indices = ranked(query, self.embeddings, params, search)
        found = self.embeddings[indices]
        if params.metric == "cosine":
            scores = np.einsum("qd,qkd->qk", unit_rows(query), unit_rows(
                found.reshape(-1, found.shape[-1])).reshape(found.shape))
        else:
            scores = np.linalg.norm(found - query[:, None, :], axis=-1)
        return indices, scores


def build_index(trained: TrainedModel, images: Path, out: Path) -> GalleryIndex:
    """Embed every image file below `images` and write the index folder `out`."""
    images = Path(images)
    if not images.is_dir():
        raise ClipcoreError(f"{images}: not a folder of images")
    files = [f for f in folder_files(images) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ClipcoreError(f"{images}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    names = [f.relative_to(images).as_posix() for f in files]
    out = Path(out)
    embeddings = _embed_in_chunks(trained, files, names, out / PARTIAL)
    metric = faiss.METRIC_INNER_PRODUCT if trained.retrieve.metric == "cosine" else faiss.METRIC_L2
    rows = unit_rows(embeddings) if trained.retrieve.metric == "cosine" else embeddings
    spec = index_spec(trained.retrieve)
    if spec is None:
        built = faiss.IndexFlat(rows.shape[1], metric)
        built.add(rows)
    else:
        built = ann.build(rows, metric, spec)
    manifest = {
        "format": FORMAT, "model": str(trained.file.resolve()), "model_sha256": trained.sha256,
        "images": str(images.resolve()), "count": len(names), "dimension": int(rows.shape[1]),
        "embed": dataclasses.asdict(trained.embed),
        "retrieve": dataclasses.asdict(trained.retrieve), "crop": _crop_record(trained)}
    (out / MANIFEST).unlink(missing_ok=True)  # until the new one: no index that mixes two builds
    write_atomic(out / EMBEDDINGS, lambda f: np.save(f, embeddings))
    write_text_atomic(out / NAMES, json.dumps(names, ensure_ascii=False) + "\n")
    write_atomic(out / INDEX, lambda f: f.write(faiss.serialize_index(built).tobytes()))
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out / PARTIAL)
    return load_index(out)


def _embed_in_chunks(trained: TrainedModel, files: list[Path], names: list[str],
                     partial: Path) -> np.ndarray:
    """The files' embeddings, reusing the chunks a previous build of the same inputs saved."""
    build = hashlib.sha256(json.dumps([trained.sha256, dataclasses.asdict(trained.embed),
                                       _crop_record(trained), names],
                                      ensure_ascii=False).encode()).hexdigest()[:16]
    if partial.is_dir() and not (partial / build).is_dir():
        shutil.rmtree(partial)  # chunks of another build: never mixed into this one
    (partial / build).mkdir(parents=True, exist_ok=True)
    starts = range(0, len(files), CHUNK)
    chunks = []
    for number, start in enumerate(starts, 1):
        saved = partial / build / f"{start:09d}.npy"
        expected = min(CHUNK, len(files) - start)
        rows = np.load(saved) if saved.is_file() else None
        if rows is None or len(rows) != expected:
            rows = trained.embed_files(files[start:start + CHUNK],
                                       desc=f"index chunk {number}/{len(starts)}")
            write_atomic(saved, lambda f: np.save(f, rows))
        chunks.append(rows)
    return np.concatenate(chunks)


def _crop_record(trained: TrainedModel) -> dict:
    return {"crop": trained.crop.crop, "crop_margin": trained.crop.margin}


def load_index(folder: Path) -> GalleryIndex:
    folder = Path(folder)
    manifest_file = folder / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
        names = json.loads((folder / NAMES).read_text(encoding="utf-8"))
        embeddings = np.load(folder / EMBEDDINGS, allow_pickle=False)
        retrieve = build(RetrieveParams, manifest["retrieve"], "retrieve.", str(manifest_file))
        built = faiss.read_index(str(folder / INDEX)) if retrieve.index != "exact" else None
    except FileNotFoundError as exc:
        raise ClipcoreError(f"{folder}: not a gallery index ({Path(exc.filename).name} missing; "
                            f"build it with `python -m clipcore.index`)") from None
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ClipcoreError(f"{folder}: damaged gallery index ({exc})") from None
    if embeddings.shape != (len(names), manifest["dimension"]) or len(names) != manifest["count"]:
        raise ClipcoreError(f"{folder}: embeddings {embeddings.shape} do not match "
                            f"{len(names)} names (an interrupted build? rebuild it)")
    return GalleryIndex(folder, Path(manifest["images"]), names, embeddings, retrieve, manifest,
                        built)
