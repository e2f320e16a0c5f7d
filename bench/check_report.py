"""Render the run report in headless Chromium (Debian's `chromium` package) and save a screenshot.

By default it first builds a run of the competition's size in a temporary folder, removed after
(1,456 queries, 1,481 gallery images of 256 px, 500 classes, rankings of epochs 0 to 10 from noisy
class-centred vectors, the model files placeholders: the report never reads them), writes best/ and
report.html there with the stages' own functions, and prints the report's size and build time.
Chromium runs with the network cut off (every host name fails to resolve), so the screenshot
shows what an offline reader sees.

    python bench/check_report.py [--out bench/out/report.png] [--html repository/report.html]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from clipcore import paths  # noqa: E402
from clipcore.report.best import write_best  # noqa: E402
from clipcore.ranking.measures import metrics_for_indices  # noqa: E402
from clipcore.params import load_params  # noqa: E402
from clipcore.retrieve.pictures import draw_grid, picture_rows  # noqa: E402
from clipcore.report.page import committed_params, write_report  # noqa: E402
from clipcore.retrieve.retrieval import write_metrics  # noqa: E402
from clipcore.ranking.search import top_k  # noqa: E402
from clipcore.train.run_files import METRIC_COLUMNS, write_metrics_csv  # noqa: E402

QUERIES, GALLERY, CLASSES, EPOCHS, DIM, SIDE = 1456, 1481, 500, 10, 64, 256
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1200,2000"]


def photo(rng: np.random.Generator, colour: np.ndarray) -> Image.Image:
    """A photo-like 256 px image: a class-coloured gradient, a few soft shapes, sensor noise."""
    ramp = np.linspace(0.6, 1.2, SIDE)[:, None, None] * colour
    pixels = np.broadcast_to(ramp, (SIDE, SIDE, 3)) + rng.normal(0, 12, (SIDE, SIDE, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y, r = rng.integers(20, SIDE - 20, 2).tolist() + [int(rng.integers(15, 60))]
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.integers(0, 256, 3).tolist()))
    return image.filter(ImageFilter.GaussianBlur(1.5))


def build_run(root: Path, rng: np.random.Generator) -> None:
    """What the stages before `best` leave, at the competition's size, under `root` (the cwd)."""
    centres = rng.standard_normal((CLASSES, DIM)).astype(np.float32)
    colours = rng.integers(40, 220, (CLASSES, 3)).astype(float)
    labels = {"query": rng.integers(0, CLASSES, QUERIES), "gallery": np.arange(GALLERY) % CLASSES}
    for split, split_labels in labels.items():
        rows = ["path,label,caption"]
        for i, label in enumerate(split_labels):
            name = f"test/{split}/{rng.bytes(16).hex()}.jpg"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            photo(rng, colours[label]).save(root / name, quality=90)
            rows.append(f"{name},{label},")
        paths.PREPARED.mkdir(parents=True, exist_ok=True)
        (paths.PREPARED / f"{split}.csv").write_text("\n".join(rows) + "\n")
    names = {split: [line.split(",")[0].rsplit("/", 1)[1]
                     for line in (paths.PREPARED / f"{split}.csv").read_text().splitlines()[1:]]
             for split in labels}
    history, test = [], {}
    for epoch in range(EPOCHS + 1):
        noise = 2.0 - epoch * 0.06  # later epochs: tighter classes (test score ~220 -> ~650)
        vectors = {split: centres[split_labels] + noise * rng.standard_normal(
            (len(split_labels), DIM)).astype(np.float32) for split, split_labels in labels.items()}
        indices = top_k(vectors["query"], vectors["gallery"], 10, "cosine")
        test[epoch] = metrics_for_indices(labels["query"], labels["gallery"], indices, k=10)
        ranking = {names["query"][q]: [names["gallery"][g] for g in row]
                   for q, row in enumerate(indices)}
        paths.results_path(epoch).parent.mkdir(parents=True, exist_ok=True)
        paths.results_path(epoch).write_text(json.dumps(ranking, indent=1))
        paths.model_path(epoch).parent.mkdir(parents=True, exist_ok=True)
        paths.model_path(epoch).write_bytes(b"placeholder: the report never reads model files")
        rows = picture_rows(QUERIES, 6)
        draw_grid(paths.picture_path(epoch), f"epoch {epoch}",
                  [root / "test/query" / names["query"][r] for r in rows],
                  [[root / "test/gallery" / names["gallery"][g] for g in indices[r]] for r in rows],
                  labels["gallery"][indices[rows]] == labels["query"][rows, None])
        val = {column: float("nan") for column in METRIC_COLUMNS}
        history.append({**val, "epoch": epoch, "score": test[epoch]["score"] + rng.normal(0, 15),
                        "top1": max(0.0, test[epoch]["top1"] + rng.normal(0, 0.015)),
                        "val_loss": noise / 2,
                        "train_loss": float("nan") if epoch == 0 else noise / 1.8})
    write_metrics_csv(history, paths.TRAINING_METRICS_CSV)
    write_metrics(test, max(test, key=lambda e: test[e]["score"]))


def screenshot(html: Path, out: Path) -> float:
    if not html.is_file():
        sys.exit(f"{html}: not found (run `dvc repro report`)")
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("chromium not found: apt-get install -y chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        start = time.perf_counter()
        done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                               f"--screenshot={out.resolve()}", html.resolve().as_uri()],
                              capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not out.is_file():
        sys.exit(f"chromium failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, help="render this report instead of building one")
    parser.add_argument("--out", type=Path, default=REPO / "bench/out/report.png")
    args = parser.parse_args()
    out = args.out.resolve()  # the run is built in another folder
    if args.html is not None:
        seconds = screenshot(args.html, out)
        print(f"chromium (offline) rendered {args.html} in {seconds:.1f} s: {out}")
        return
    params = load_params(REPO / "params.yaml")
    committed = committed_params()  # the repository's HEAD, read before leaving it
    with tempfile.TemporaryDirectory(prefix="check_report_") as folder:
        work = Path(folder)
        os.chdir(work)
        start = time.perf_counter()
        build_run(work, np.random.default_rng(0))
        print(f"built a run of {QUERIES} queries x {GALLERY} gallery images, {EPOCHS} epochs "
              f"in {time.perf_counter() - start:.0f} s")
        start = time.perf_counter()
        params = dataclasses.replace(params, data=dataclasses.replace(params.data, root=str(work)))
        summary = write_best(params)
        html = write_report(params.report, work, committed=committed)
        print(f"best + report: {time.perf_counter() - start:.1f} s; best epoch {summary['epoch']}; "
              f"{html}: {html.stat().st_size / 1024:.0f} kB "
              f"({params.report.worst_queries} worst queries shown)")
        print(f"chromium (offline) rendered {html} in {screenshot(html, out):.1f} s: {out}")
        os.chdir(REPO)  # out of the folder before it goes


if __name__ == "__main__":
    main()
