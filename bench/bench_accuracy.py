"""What fine-tuning gains over the untouched model, measured through the real pipeline.

No hub weights can be had here, so the bench makes a pretrained base the way CLIP is made:
the tiny open_clip model (clipcore/model_configs/tiny.json) is trained CLIP-style, both towers,
on images and captions of the digits 0-4, and saved as a local weights file. Then, exactly as a
user does with OpenAI's weights, `model.pretrained: <that file>` is fine-tuned by the pipeline's
own code (prepare -> train -> embed -> retrieve) on the digits 5-9, classes the base never saw,
and scored on their query/gallery split. In one run it prints, on the same split:

- raw-pixel kNN (cosine on the pixels),
- epoch 0: the untouched base (zero-shot transfer),
- the seed's recipe: plain CLIP loss (same-class pairs as negatives), frozen caption targets,
  raw features into the head, head lr 1e-4 (backbone 1e-6), wd 1e-4, dropout 0.3, no warmup,
- the previous defaults of this project (raw features into the head, caption-initialised
  targets, head lr 1e-3, backbone 1e-5, 5 epochs), on today's code,
- this project's default (params.yaml),

each frozen and unfrozen: epoch 0, the best epoch's test score and top-1/5/10, the last epoch,
and the epoch the val metrics pick. `--demo` adds the same for the tiny random-init model on the
demo data (all ten digits), the smoke run of the README.

    python bench/bench_accuracy.py [--epochs N] [--demo] [--out /tmp/bench_accuracy]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipcore.demo import write_demo  # noqa: E402
from clipcore.embedding import embed_all  # noqa: E402
from clipcore.loss import RetrievalClipLoss  # noqa: E402
from clipcore.manifests import caption, prepare, read_manifest  # noqa: E402
from clipcore.measures import metrics_for_indices  # noqa: E402
from clipcore.model import build_model  # noqa: E402
from clipcore.params import Params, parse_params  # noqa: E402
from clipcore.retrieval import retrieve_all  # noqa: E402
from clipcore.search import top_k  # noqa: E402
from clipcore.training import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_DIGITS, FINETUNE_DIGITS = range(0, 5), range(5, 10)
RECIPES = {
    "seed's recipe": {"loss.same_class_positives": False, "loss.text_targets": "frozen",
                      "loss.target_init": "caption", "train.standardize_features": False,
                      "train.lr": 1e-4, "train.backbone_lr_scale": 0.01,
                      "train.weight_decay": 1e-4, "model.dropout": 0.3,
                      "train.warmup_fraction": 0.0},
    "previous default": {"train.standardize_features": False, "loss.target_init": "caption",
                         "train.lr": 1e-3, "train.backbone_lr_scale": 0.01, "train.epochs": 5},
    "default": {},
}
MODES = {"frozen": {"train.freeze_backbone": True}, "unfrozen": {"train.freeze_backbone": False}}


def bench_params(overrides: dict) -> Params:
    """The repo's params.yaml (the project defaults) with dotted-key overrides."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        target = raw
        for section in sections:
            target = target[section]
        target[key] = value
    return parse_params(raw)


def pretrain_base(root: Path, out: Path, params: Params, epochs: int) -> Path:
    """Train the tiny model's two towers CLIP-style on the images and captions under root/train;
    save its state dict (what open_clip loads as `pretrained=<file>`)."""
    torch.manual_seed(params.seed)
    model = build_model(params.model)  # random init: model.pretrained none
    clip = model.clip
    clip.requires_grad_(True)
    frame = read_manifest(root / "prepared", "train")
    classes = sorted(frame["label"].unique())
    labels = torch.tensor([classes.index(label) for label in frame["label"]])
    images = torch.stack([model.preprocess_val(Image.open(root / p)) for p in frame["path"]])
    tokens = model.tokenizer([caption(name, params.data) for name in classes])
    loss_fn = RetrievalClipLoss(same_class_positives=True)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=1e-3, weight_decay=0.1,
                                  betas=(0.9, 0.98), eps=1e-6)
    clip.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels)).split(64):
            image_emb = clip.encode_image(images[batch], normalize=True)
            text_emb = clip.encode_text(tokens, normalize=True)[labels[batch]]
            loss = loss_fn(image_emb, text_emb, labels[batch], clip.logit_scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.clamp_logit_scale()
    print(f"pretrained the tiny model on digits {PRETRAIN_DIGITS.start}-"
          f"{PRETRAIN_DIGITS.stop - 1} for {epochs} epochs: last batch loss {loss.item():.3f}")
    torch.save(clip.state_dict(), out)
    return out


def write_data(root: Path, params: Params, digits) -> None:
    write_demo(root, params.demo, params.seed, digits_kept=digits)
    prepare(root, root / "prepared", params.data, params.seed)


def run_pipeline(work: Path, data_root: Path, params: Params) -> tuple[list[dict], dict, float]:
    """train -> embed -> retrieve in `work` (the pipeline's relative paths live there): the
    training history, the test metrics by epoch, and the seconds it took."""
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with contextlib.chdir(work):
        history = train(params, data_root, data_root / "prepared")
        embed_all(params, data_root, data_root / "prepared")
        report = retrieve_all(params.retrieve, data_root, data_root / "prepared")
    return history, report.metrics, time.perf_counter() - started


def pixel_knn(data_root: Path) -> dict:
    """Test metrics of cosine kNN on raw pixels: what is there to learn without any model."""
    frames = {split: read_manifest(data_root / "prepared", split) for split in ("query", "gallery")}
    pixels = {split: np.stack([np.asarray(Image.open(data_root / p).convert("L"), np.float32).ravel()
                               for p in frame["path"]]) for split, frame in frames.items()}
    indices = top_k(pixels["query"], pixels["gallery"], 10, "cosine")
    return metrics_for_indices(frames["query"]["label"].to_numpy(),
                               frames["gallery"]["label"].to_numpy(), indices)


def summary(history: list[dict], test: dict) -> dict:
    """Epoch 0, best and last test scores, and the test score of the epoch val would pick."""
    best = max(test, key=lambda e: (test[e]["score"], -e))
    val_scores = {row["epoch"]: row["score"] for row in history}
    picked = max(val_scores, key=lambda e: (val_scores[e], -e))
    last = max(test)
    return {"epoch0": test[0]["score"], "best_epoch": best, "best": test[best],
            "last": test[last]["score"], "val_pick": picked, "val_pick_score": test[picked]["score"],
            "val0": val_scores[0], "val_best": val_scores[picked]}


def print_table(title: str, rows: list[tuple[str, dict, float]], knn: dict) -> None:
    print(f"\n{title}")
    print(f"{'recipe':30s} {'epoch 0':>7s} {'best (ep)':>11s} {'top-1':>6s} {'top-5':>6s} "
          f"{'top-10':>6s} {'last':>6s} {'val picks (test)':>17s} {'val 0->best':>13s} {'s':>5s}")
    print(f"{'raw-pixel kNN':30s} {'':7s} {knn['score']:11.1f} {knn['top1']:6.3f} "
          f"{knn['top5']:6.3f} {knn['top10']:6.3f}")
    for name, s, seconds in rows:
        b = s["best"]
        print(f"{name:30s} {s['epoch0']:7.1f} {b['score']:7.1f} ({s['best_epoch']}) {b['top1']:6.3f} "
              f"{b['top5']:6.3f} {b['top10']:6.3f} {s['last']:6.1f} "
              f"{s['val_pick_score']:10.1f} (ep {s['val_pick']}) {s['val0']:6.1f}->{s['val_best']:5.1f} "
              f"{seconds:5.0f}")


def bench(title: str, data_root: Path, work: Path, base: dict, recipes: dict) -> None:
    rows = []
    for name, overrides in recipes.items():
        for mode, mode_overrides in MODES.items():
            params = bench_params({**base, **overrides, **mode_overrides})
            history, test, seconds = run_pipeline(work / f"{name}-{mode}".replace(" ", "_")
                                                  .replace("'", ""), data_root, params)
            rows.append((f"{name}, {mode}", summary(history, test), seconds))
            print(f"  done: {name}, {mode} ({seconds:.0f} s)", flush=True)
    print_table(title, rows, pixel_knn(data_root))


def add_bench_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (default: train.epochs)")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(out))


def bench_setup(args: argparse.Namespace, demo: bool) -> tuple[dict, Path, dict[str, Path]]:
    """Write the digit data roots and pretrain the base: (the tiny-model overrides, the base's
    weights file, the data roots by name: finetune, and demo when asked)."""
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    epochs = args.epochs or bench_params({}).train.epochs
    tiny = {"model.name": "tiny", "train.epochs": epochs}
    params = bench_params({**tiny, "model.pretrained": "none"})
    roots = {"finetune": out / "finetune_digits", **({"demo": out / "demo"} if demo else {})}
    write_data(out / "pretrain_digits", params, PRETRAIN_DIGITS)
    write_data(roots["finetune"], params, FINETUNE_DIGITS)
    if demo:
        write_data(roots["demo"], params, range(10))
    weights = pretrain_base(out / "pretrain_digits", out / "tiny_pretrained.pt", params,
                            args.pretrain_epochs)
    return tiny, weights, roots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser, "/tmp/bench_accuracy")
    parser.add_argument("--demo", action="store_true", help="also the tiny random-init demo rows")
    args = parser.parse_args()
    tiny, weights, roots = bench_setup(args, args.demo)
    epochs, out = tiny["train.epochs"], args.out.resolve()
    bench(f"pretrained tiny base (digits 0-4) fine-tuned on digits 5-9, {epochs} epochs, "
          f"test score out of 1000", roots["finetune"], out / "runs",
          {**tiny, "model.pretrained": str(weights)}, RECIPES)
    if args.demo:
        bench(f"demo: tiny random-init model, all ten digits, {epochs} epochs",
              roots["demo"], out / "demo_runs", {**tiny, "model.pretrained": "none"},
              {name: RECIPES[name] for name in ("previous default", "default")})


if __name__ == "__main__":
    main()
