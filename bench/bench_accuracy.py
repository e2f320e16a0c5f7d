"""What fine-tuning gains over the untouched base, measured through the real pipeline, with
epochs picked by validation, several seeds and 95% confidence intervals.

No hub weights can be had here, so the bench makes a pretrained base as CLIP was made: elsewhere.
The tiny open_clip model's image tower is trained (a normalised-softmax proxy loss) on identities
the fine-tuning never sees, and saved as a local weights file; then, as a user does with OpenAI's
weights, `model.pretrained: <that file>` is fine-tuned by the pipeline's own code (prepare ->
train -> embed -> retrieve). Two domains:

- generated (clipcore/demo/domain.py, competition-shaped): identities of coloured shapes, 5 training
  images each in two renderings; photo-like queries against render-like gallery images.
  Base: 600 identities x 6 images. Fine-tuning: 240 identities, 15% of them held out for validation
  (data.val_split class). Open set: 300 identities in neither (600 queries); closed set: new
  images of the trained identities (3 queries, 2 gallery each).
- digits (clipcore/demo/digits.py): base on digits 0-3; fine-tuning on 4-6 (data.val_split image);
  open set 7-9; closed set: the held-out images of 4-6. Few classes: their intervals say so.

A seed draws the split (which identities train, which are tested; the digits' images), the
initialisation and the batch order; the base and the generated world stay fixed. Each row is
a mean over seeds with a Student-t 95% interval. The headline is the test score at the epoch a
validation protocol picks; best-on-test is printed only as an upper bound. Validation protocols:

- `class-mixed`: the trainer's own (held-out identities query each other, both renderings);
- `photo->render`: the same held-out identities, photo queries against render gallery, the way
  the test is drawn (renderings told by the training files' names);
- `image`: the trainer's own under the image split (digits).

The bench also reports how well each protocol ranks the test (Spearman's rho of val and test
score over every epoch of every run, pooled, and the mean of the per-run rhos).

    OMP_NUM_THREADS=1 python bench/bench_accuracy.py [--seeds 5] [--epochs N] [--quick]
        [--domains generated,digits] [--modes frozen,unfrozen] [--with KEY=VALUE ...] [--each]
        [--base-identities 600]    # how many identities the generated base is pretrained on
        [--finetune-identities 240]  # identities fine-tuned on (up to 700)
        [--base-renderings photo]  # a generated base that never saw a render (as CLIP never
                                   # saw the competition's renders paired with its photos)

(one thread: on 2 shared cores, two torch threads ran the tiny model 18x slower than one.)
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipcore import paths  # noqa: E402

from clipcore.report import compare  # noqa: E402
from clipcore.report.best import pick  # noqa: E402
from clipcore.demo.digits import write_demo  # noqa: E402
from clipcore.demo.domain import (GALLERY_RENDERING, QUERY_RENDERING, RENDERINGS,  # noqa: E402
                             rendering_of, write_domain)
from clipcore.retrieve.embedding import embed_all  # noqa: E402
from clipcore.data.manifests import prepare, read_manifest  # noqa: E402
from clipcore.ranking.measures import metrics_for_indices  # noqa: E402
from clipcore.model.factory import build_model  # noqa: E402
from clipcore.params import Params, parse_params, with_overrides  # noqa: E402
from clipcore.report.recipes import SEED_RECIPE  # noqa: E402
from clipcore.retrieve.retrieval import retrieve_all  # noqa: E402
from clipcore.ranking.search import top_k  # noqa: E402
from clipcore.train.training import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOMAIN_SEED = 0  # the generated world (identities, their images); bench seeds draw splits
MODES = {"frozen": {"train.freeze_backbone": True}, "unfrozen": {"train.freeze_backbone": False}}
SETS = ("open", "closed")


@dataclass(frozen=True)
class Sizes:
    base_identities: int = 600
    base_renderings: tuple[str, ...] = RENDERINGS  # ("photo",): a base that never saw a render
    base_images: int = 6
    finetune_identities: int = 240
    open_identities: int = 300
    pool: int = 1000  # identities after the base's, from which each seed draws its split


QUICK = Sizes(base_identities=150, finetune_identities=60, open_identities=80, pool=200)


@dataclass
class Run:
    """One fine-tuning run: per-epoch val scores by protocol and test scores by set."""
    val: dict[str, dict[int, float]] = field(default_factory=dict)
    test: dict[str, dict[int, float]] = field(default_factory=dict)
    seconds: float = 0.0
    epoch_seconds: float = 0.0  # mean seconds of a training epoch (its validation included)


@functools.cache
def defaults() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def bench_params(overrides: dict) -> Params:
    """The repo's params.yaml (the project defaults, read once per bench: every run sees the
    same) with dotted-key overrides."""
    return parse_params(with_overrides(defaults(), overrides))


# The base's optimiser per stand-in: (lr, one warmup epoch then cosine). The 6-block tower
# ended 40 constant-lr epochs at 3e-3 with a loss of 5.27 over 600 identities (ln 600 = 6.4):
# barely a base. The tiny one keeps its constant 3e-3, so its measured numbers stand.
PRETRAIN_RECIPES = {"tiny": (3e-3, False), "tiny-deep": (1e-3, True)}


def pretrain_base(root: Path, out: Path, epochs: int, seed: int = 0, model_name: str = "tiny"
                  ) -> Path:
    """Train the stand-in's image tower on the identities under root/train with a normalised
    softmax over learnable class proxies; save the whole open_clip state dict (what
    `model.pretrained: <file>` loads). The text tower stays at its random init. Cached: a file
    of the same model, epochs and identities is reused (the deep stand-in costs minutes)."""
    if out.is_file():
        print(f"  base: {out} (cached)", flush=True)
        return out
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model(bench_params({"model.name": model_name, "model.pretrained": "none"}).model)
    visual = model.clip.visual
    visual.requires_grad_(True)
    files = sorted((root / "train").glob("*/*.png"))
    classes = sorted({f.parent.name for f in files})
    labels = torch.tensor([classes.index(f.parent.name) for f in files])
    images = model.normalise(torch.stack([model.preprocess_val(Image.open(f)) for f in files]))
    proxies = torch.nn.Parameter(torch.randn(len(classes), model.embed_dim) * 0.01)
    lr, scheduled = PRETRAIN_RECIPES[model_name]
    optimizer = torch.optim.AdamW([*visual.parameters(), proxies], lr=lr, weight_decay=0.05)
    steps = epochs * -(-len(labels) // 64)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (
        min(1.0, (step + 1) / (steps / epochs)) * 0.5 * (1 + math.cos(math.pi * step / steps))
        if scheduled else 1.0))
    visual.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels)).split(64):
            x = images[batch]
            x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, torch.flip(x, dims=[3]), x)
            shifts = torch.randint(-4, 5, (len(x), 2)).tolist()  # a new crop of each image
            x = torch.stack([torch.roll(image, shift, dims=(1, 2)) for image, shift in zip(x, shifts)])
            logits = 16 * F.normalize(visual(x), dim=-1) @ F.normalize(proxies, dim=-1).T
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    print(f"  base: {model_name}, {len(classes)} identities, {len(files)} images, {epochs} "
          f"epochs, last batch loss {loss.item():.3f}, pretrained in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    torch.save(model.clip.state_dict(), out)
    return out


def run_pipeline(work: Path, roots: dict[str, Path], val_prepared: Path | None,
                 params: Params) -> Run:
    """train on roots["open"]'s training images, then embed and retrieve each test set (and the
    photo->render val set), in `work` (the pipeline's relative paths live there)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    run = Run()
    with contextlib.chdir(work):
        history = train(params, roots["open"], roots["open"] / "prepared")
        run.val[own_protocol(params)] = {row["epoch"]: row["score"] for row in history}
        run.epoch_seconds = float(np.mean([row["seconds"] for row in history if row["epoch"]]))
        for name, root in roots.items():
            embed_all(params, root, root / "prepared")
            run.test[name] = {epoch: m["score"] for epoch, m in
                              retrieve_all(params.retrieve, root, root / "prepared").metrics.items()}
        if val_prepared is not None:
            run.val["photo->render"] = photo_render_scores(params, roots["open"], val_prepared)
    run.seconds = time.perf_counter() - started
    return run


def photo_render_scores(params: Params, root: Path, val_prepared: Path) -> dict[int, float]:
    """Each epoch's score of the val photos querying the val renders. Measured on the
    embeddings in manifest order, not through retrieve: training files share base names
    (photo_0.png in every class folder), and results name images by base name."""
    embed_all(params, root, val_prepared)
    labels = {split: read_manifest(val_prepared, split)["label"].to_numpy()
              for split in ("query", "gallery")}
    scores = {}
    for file in paths.epoch_files(paths.EMBEDDINGS, "epoch_*.npz"):
        with np.load(file) as saved:
            indices = top_k(saved["query"], saved["gallery"], 10, "cosine")
        scores[paths.epoch_of(file)] = metrics_for_indices(labels["query"], labels["gallery"],
                                                           indices)["score"]
    return scores


def own_protocol(params: Params) -> str:
    return "class-mixed" if params.data.val_split == "class" else "image"


def photo_render_val(prepared: Path, out: Path) -> Path:
    """Manifests that make the val identities a test of their own: photo queries, render
    gallery (the rendering told by the file name)."""
    out.mkdir(parents=True, exist_ok=True)
    val = read_manifest(prepared, "val")
    rendering = val["path"].map(rendering_of)
    for split, kept in (("query", QUERY_RENDERING), ("gallery", GALLERY_RENDERING)):
        val[rendering == kept].to_csv(out / f"{split}.csv", index=False)
    return out


def pixel_knn(root: Path) -> float:
    """Test score of cosine kNN on raw pixels: what is there without any model."""
    frames = {split: read_manifest(root / "prepared", split) for split in ("query", "gallery")}
    pixels = {split: np.stack([np.asarray(Image.open(root / p).convert("RGB"), np.float32).ravel()
                               for p in frame["path"]]) for split, frame in frames.items()}
    indices = top_k(pixels["query"], pixels["gallery"], 10, "cosine")
    return metrics_for_indices(frames["query"]["label"].to_numpy(),
                               frames["gallery"]["label"].to_numpy(), indices)["score"]


def generated_roots(out: Path, seed: int, sizes: Sizes, data: dict) -> tuple[dict, Path]:
    """This seed's open and closed data roots (shared training images) and the photo->render
    val manifests."""
    rng = np.random.default_rng(seed)
    pool = sizes.base_identities + rng.permutation(sizes.pool)
    finetune = sorted(pool[:sizes.finetune_identities].tolist())
    unseen = sorted(pool[sizes.finetune_identities:][:sizes.open_identities].tolist())
    params = bench_params(data)
    roots = {name: out / f"seed{seed}" / name for name in SETS}
    write_domain(roots["open"], finetune, unseen, DOMAIN_SEED)
    prepare(roots["open"], roots["open"] / "prepared", params.data, seed)
    held_out = set(read_manifest(roots["open"] / "prepared", "val")["label"])
    trained = [n for n in finetune if f"{n:04d}" not in held_out]
    write_domain(roots["closed"], finetune, trained, DOMAIN_SEED, queries=3, gallery=2)
    prepare(roots["closed"], roots["closed"] / "prepared", params.data, seed)
    return roots, photo_render_val(roots["open"] / "prepared", out / f"seed{seed}" / "val_pr")


def digit_roots(out: Path, seed: int, data: dict) -> dict:
    """This seed's digit roots: train on 4-6; open: test on 7-9; closed: held-out 4-6."""
    params = bench_params(data)
    roots = {name: out / f"digits_seed{seed}" / name for name in SETS}
    write_demo(roots["closed"], params.demo, seed, digits_kept=range(4, 7))
    unseen = out / f"digits_seed{seed}" / "unseen"
    write_demo(unseen, params.demo, seed, digits_kept=range(7, 10))
    shutil.rmtree(roots["open"], ignore_errors=True)
    shutil.copytree(unseen, roots["open"], ignore=shutil.ignore_patterns("train"))
    shutil.copytree(roots["closed"] / "train", roots["open"] / "train")
    for root in roots.values():
        prepare(root, root / "prepared", params.data, seed)
    return roots


def mean_ci(values) -> str:
    """mean +- half-width of the Student-t 95% interval (n) of values (clipcore.report.compare's)."""
    mean, half = compare.mean_ci([float(v) for v in values])
    if half is None:
        return f"{mean:6.1f}          (n={len(values)})"
    return f"{mean:6.1f} ± {half:5.1f} (n={len(values)})"


def picked_epoch(run: Run, protocol: str) -> int:
    """The epoch the protocol's val score picks (the best stage's rule)."""
    return pick([{"epoch": e, "score": s} for e, s in sorted(run.val[protocol].items())]).epoch


def picked(run: Run, protocol: str, test_set: str) -> float:
    """Test score of the epoch the protocol's val score picks."""
    return run.test[test_set][picked_epoch(run, protocol)]


def modes_of(runs: dict) -> list[str]:
    return [mode for mode in MODES if any(m == mode for _, m in runs)]


def report(domain: str, runs: dict, knn: dict, protocols: list[str]) -> None:
    """One block per (set, mode): rows raw pixels, epoch 0, each recipe; columns each
    protocol's val-picked test score, last epoch, best on test (upper bound), and the default's
    paired gains."""
    print(f"\n{domain}, validation only (the evidence a default may change on): "
          f"best val score of each run, mean ± 95% CI; other rows also paired with the default's "
          f"run of the same seed")
    for mode in modes_of(runs):
        default = runs[("default", mode)]
        for recipe in [name for name, m in runs if m == mode]:
            cells = []
            for p in protocols:
                best = [max(r.val[p].values()) for r in runs[(recipe, mode)]]
                cell = f"{p}: {mean_ci(best)}"
                if recipe != "default":
                    cell += f" (paired: {mean_ci(np.subtract(best, [max(r.val[p].values()) for r in default]))})"
                cells.append(cell)
            print(f"  {mode:9s} {recipe:24s} " + " | ".join(cells))
    for test_set in SETS:
        for mode in modes_of(runs):
            print(f"\n{domain}, {test_set} set, {mode} (test score /1000, mean ± 95% CI)")
            print(f"  {'raw-pixel kNN':24s} {mean_ci(knn[test_set])}")
            default = runs[("default", mode)]
            epoch0 = [r.test[test_set][0] for r in default]
            hard = np.mean(knn[test_set]) < np.mean(epoch0) / 2
            print(f"  {'epoch 0 (untouched)':24s} {mean_ci(epoch0)}   raw pixels below half "
                  f"of it: {'yes' if hard else 'no: pixels can match this set'}")
            for recipe in [name for name, m in runs if m == mode]:
                rs = runs[(recipe, mode)]
                cells = [f"picked by {p}: {mean_ci([picked(r, p, test_set) for r in rs])}"
                         for p in protocols]
                cells.append(f"last: {mean_ci([r.test[test_set][max(r.test[test_set])] for r in rs])}")
                cells.append(f"best on test (upper bound): "
                             f"{mean_ci([max(r.test[test_set].values()) for r in rs])}")
                print(f"  {recipe:24s} " + " | ".join(cells))
            for p in protocols:
                gains = {"epoch 0": [picked(r, p, test_set) - r.test[test_set][0] for r in default]}
                if ("seed's recipe", mode) in runs:
                    gains["seed's recipe"] = [picked(d, p, test_set) - picked(s, p, test_set)
                                              for d, s in zip(default,
                                                              runs[("seed's recipe", mode)])]
                print(f"  default gain over (paired, picked by {p}): "
                      + " | ".join(f"{name}: {mean_ci(v)}" for name, v in gains.items()))
                for recipe in candidates_of(runs, mode):
                    rs = runs[(recipe, mode)]
                    over_base = [picked(r, p, test_set) - r.test[test_set][0] for r in rs]
                    over_default = [picked(r, p, test_set) - picked(d, p, test_set)
                                    for r, d in zip(rs, default)]
                    print(f"  {recipe} gain over (paired, picked by {p}): epoch 0: "
                          f"{mean_ci(over_base)} | default: {mean_ci(over_default)}")


def candidates_of(runs: dict, mode: str) -> list[str]:
    """The `--with` rows run in this mode."""
    return [name for name, m in runs if m == mode and name not in ("default", "seed's recipe")]


def protocol_report(domain: str, runs: dict, protocols: list[str]) -> None:
    """Spearman's rho between each protocol's val score and the test score over every epoch of
    every run (pooled), and the mean of the per-run rhos."""
    print(f"\n{domain}: how well validation ranks the test (Spearman rho, epochs x runs; "
          f"nan: a constant score)")
    warnings.simplefilter("ignore", stats.ConstantInputWarning)
    warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of runs whose val never moved
    for mode in modes_of(runs):
        rs = [r for (recipe, m), group in runs.items() if m == mode for r in group]
        for p in protocols:
            cells = []
            for test_set in SETS:
                val = [r.val[p][e] for r in rs for e in sorted(r.val[p])]
                test = [r.test[test_set][e] for r in rs for e in sorted(r.val[p])]
                per_run = [stats.spearmanr([r.val[p][e] for e in sorted(r.val[p])],
                                           [r.test[test_set][e] for e in sorted(r.val[p])])[0]
                           for r in rs]
                cells.append(f"{test_set}: pooled {stats.spearmanr(val, test)[0]:+.2f}, "
                             f"per run {np.nanmean(per_run):+.2f}")
            print(f"  {mode:9s} {p:14s} " + " | ".join(cells))


def recipes(candidate: dict, seed_recipe: bool = True, each: bool = False) -> dict[str, dict]:
    """The rows: the seed's recipe (when asked), the default, and a candidate (the default with
    `--with` overrides) when one is given; with `each`, a row per override (levers alone)."""
    rows = {"default": {}}
    if seed_recipe:
        rows = {"seed's recipe": dict(SEED_RECIPE), **rows}
    for overrides in ([{k: v} for k, v in candidate.items()] if each else [candidate] * bool(candidate)):
        rows["default + " + " ".join(f"{k}={v}" for k, v in overrides.items())] = overrides
    return rows


def bench_domain(domain: str, seeds: range, base: dict, data: dict, make_roots,
                 protocols: list[str], work: Path, rows: dict, modes: list[str]) -> None:
    """Every recipe, frozen and unfrozen, on each seed's split. `data`: the bench's validation
    split, the same for every row (a recipe's own val split would only change which images
    train and how epochs are picked)."""
    runs: dict[tuple[str, str], list[Run]] = {}
    knn = {name: [] for name in SETS}
    for seed in seeds:
        roots, val_prepared = make_roots(seed)
        for name in SETS:
            knn[name].append(pixel_knn(roots[name]))
        for recipe, overrides in rows.items():
            for mode in modes:
                mode_overrides = MODES[mode]
                params = bench_params({**base, **overrides, **mode_overrides, **data, "seed": seed})
                run = run_pipeline(work / "run", roots, val_prepared, params)
                runs.setdefault((recipe, mode), []).append(run)
                print(f"  done: {domain}, seed {seed}, {recipe}, {mode} ({run.seconds:.0f} s): "
                      f"open {run.test['open'][0]:.0f} -> best {max(run.test['open'].values()):.0f}",
                      flush=True)
    report(domain, runs, knn, protocols)
    protocol_report(domain, runs, protocols)


@dataclass
class Domain:
    """A benchmark domain ready to run: the tiny model on its pretrained base, the val split every
    row uses, each seed's data roots (and photo->render val manifests, or None), the protocols."""
    name: str
    base: dict
    data: dict
    make_roots: object  # seed -> (roots by test set, photo->render val manifests or None)
    protocols: list[str]


def tiny_overrides(epochs: int, model_name: str = "tiny") -> dict:
    # Decoding 32-px images in the main process beats starting DataLoader workers every epoch.
    return {"model.name": model_name, "train.epochs": epochs, "retrieve.picture_queries": 0,
            "train.num_workers": 0, "embed.num_workers": 0, "train.device": "cpu"}


def setup_domain(name: str, out: Path, sizes: Sizes, epochs: int, pretrain_epochs: int,
                 model_name: str = "tiny") -> Domain:
    """Write the domain's base data, pretrain its base (saved under out) and return it."""
    cached = f"{model_name}_{pretrain_epochs}e"
    if name == "generated":
        data = {"data.val_split": "class"}
        write_domain(out / "base", range(sizes.base_identities), range(2), DOMAIN_SEED,
                     train_images=sizes.base_images, renderings=sizes.base_renderings)
        weights = pretrain_base(out / "base", out / f"generated_base_{cached}_"
                                f"{sizes.base_identities}_{'+'.join(sizes.base_renderings)}.pt",
                                pretrain_epochs, model_name=model_name)
        return Domain(name, {**tiny_overrides(epochs, model_name),
                             "model.pretrained": str(weights)}, data,
                      lambda seed: generated_roots(out, seed, sizes, data),
                      ["class-mixed", "photo->render"])
    if name == "digits":
        data = {"data.val_split": "image"}
        write_demo(out / "digits_base", bench_params({}).demo, DOMAIN_SEED, digits_kept=range(4))
        weights = pretrain_base(out / "digits_base", out / f"digits_base_{cached}.pt",
                                pretrain_epochs, model_name=model_name)
        return Domain(name, {**tiny_overrides(epochs, model_name),
                             "model.pretrained": str(weights)}, data,
                      lambda seed: (digit_roots(out, seed, data), None), ["image"])
    raise SystemExit(f"--domains: unknown domain {name!r} (generated, digits)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (default: train.epochs)")
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--domains", default="generated,digits")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 seeds, 2 epochs, a small generated domain")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_accuracy"))
    parser.add_argument("--with", dest="candidate", action="append", default=[],
                        metavar="KEY=VALUE", help="add a row: the default with these params")
    parser.add_argument("--each", action="store_true",
                        help="a row per --with instead of one row with all (each lever alone)")
    parser.add_argument("--modes", default="frozen,unfrozen")
    parser.add_argument("--no-seed-recipe", action="store_true")
    parser.add_argument("--base-identities", type=int, default=Sizes.base_identities,
                        help="identities the generated domain's base is pretrained on")
    parser.add_argument("--finetune-identities", type=int, default=Sizes.finetune_identities,
                        help="identities fine-tuned on (the competition has 921; at most "
                             f"{Sizes.pool - Sizes.open_identities} beside the open set)")
    parser.add_argument("--stand-in", default="tiny", choices=("tiny", "tiny-deep"),
                        help="the model: tiny (2 blocks, 32 px) or tiny-deep (6 blocks of width "
                             "128 at 48 px: deep enough for last-k blocks and layer decay)")
    parser.add_argument("--base-renderings", default=",".join(RENDERINGS),
                        help="renderings the generated base sees (photo: never a render)")
    args = parser.parse_args()
    candidate = {key: yaml.safe_load(value) for key, value in
                 (item.split("=", 1) for item in args.candidate)}
    rows, modes = recipes(candidate, not args.no_seed_recipe, args.each), args.modes.split(",")
    sizes, seeds = ((QUICK, range(2)) if args.quick
                    else (Sizes(base_identities=args.base_identities,
                                base_renderings=tuple(args.base_renderings.split(",")),
                                finetune_identities=args.finetune_identities),
                          range(args.seeds)))
    epochs = 2 if args.quick else (args.epochs or bench_params({}).train.epochs)
    pretrain_epochs = 3 if args.quick else args.pretrain_epochs
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(seeds)} seeds, {epochs} epochs; recipes: {', '.join(rows)}", flush=True)
    for name in args.domains.split(","):
        domain = setup_domain(name, out, sizes, epochs, pretrain_epochs, args.stand_in)
        bench_domain(domain.name, seeds, domain.base, domain.data, domain.make_roots,
                     domain.protocols, out, rows, modes)

if __name__ == "__main__":
    main()
