"""The accuracy levers, each off and on, frozen and unfrozen, in one run: WiSE-FT
(embed.wise_ft_alpha), flip TTA (embed.tta), class-balanced batches (train.sampler), query
expansion / DBA / k-reciprocal re-ranking (retrieve.rerank, dba_k). For each: the last epoch's
test score, top-1/5/10 and mAP@10, and the seconds of the stage it changes against the same
stage without it (a warm rerun).

Two data sets: the digits 5-9 fine-tuned from a base (the tiny open_clip model's image tower
pretrained on the digits 0-4 by bench/bench_accuracy.py's pretrain_base, saved as a local weights
file) and the demo (the tiny random-init model on all ten digits). One seed, the last epoch: not
yet on bench_accuracy.py's seeded, val-picked harness or its generated domain.

    python bench/bench_levers.py [--epochs N] [--out /tmp/bench_levers]

`--seeded` instead measures the levers that act after training (WiSE-FT, flip TTA, alpha-QE,
k-reciprocal) on bench_accuracy.py's domains (generated and digits) over several seeds
(`--seeds`), each at the epoch the domain's own validation picked, as paired changes with 95%
intervals (class-balanced batches, a training lever, are a row of bench/bench_losses.py):

    OMP_NUM_THREADS=1 python bench/bench_levers.py --seeded --seeds 5 --epochs 8 --pretrain-epochs 40

Runs the pipeline's own train / embed / retrieve functions; the params are params.yaml's.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bench_accuracy as ba  # noqa: E402  (same folder)
from bench_accuracy import bench_params, pretrain_base  # noqa: E402
from bench_embed import timed  # noqa: E402
from clipcore.demo.digits import write_demo  # noqa: E402
from clipcore.data.manifests import prepare  # noqa: E402
from clipcore.retrieve.embedding import embed_all  # noqa: E402
from clipcore.params import Params  # noqa: E402
from clipcore.retrieve.rerank import k_reciprocal_distances  # noqa: E402
from clipcore.retrieve.retrieval import retrieve_all  # noqa: E402
from clipcore.ranking.search import top_k  # noqa: E402
from clipcore.train.training import train  # noqa: E402


@dataclass(frozen=True)
class Lever:
    name: str          # the lever
    setting: str       # its keys, as `dvc exp run -S` would set them
    stage: str         # the stage it changes: train, embed or retrieve
    overrides: dict


def levers(images_per_class: int) -> list[Lever]:
    return [
        Lever("baseline", "(all off)", "", {}),
        *[Lever("WiSE-FT", f"embed.wise_ft_alpha={a}", "embed", {"embed.wise_ft_alpha": a})
          for a in (0.25, 0.5, 0.75)],
        Lever("flip TTA", "embed.tta=flip", "embed", {"embed.tta": "flip"}),
        Lever("class-balanced", f"train.sampler=class_balanced "
              f"train.images_per_class={images_per_class}", "train",
              {"train.sampler": "class_balanced", "train.images_per_class": images_per_class}),
        Lever("alpha-QE", "retrieve.rerank=aqe", "retrieve", {"retrieve.rerank": "aqe"}),
        Lever("alpha-QE + DBA", "retrieve.rerank=aqe retrieve.dba_k=2", "retrieve",
              {"retrieve.rerank": "aqe", "retrieve.dba_k": 2}),
        Lever("k-reciprocal", "retrieve.rerank=kreciprocal", "retrieve",
              {"retrieve.rerank": "kreciprocal"}),
    ]


PRETRAIN_DIGITS, FINETUNE_DIGITS = range(0, 5), range(5, 10)


def add_bench_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (default: train.epochs)")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(out))


def write_data(root: Path, params: Params, digits) -> None:
    write_demo(root, params.demo, params.seed, digits_kept=digits)
    prepare(root, root / "prepared", params.data, params.seed)


def bench_setup(args: argparse.Namespace, demo: bool) -> tuple[dict, Path, dict[str, Path]]:
    """Write the digit data roots and pretrain the base on digits 0-4: (the tiny-model
    overrides, the base's weights file, the data roots by name: finetune, and demo when asked)."""
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
    weights = pretrain_base(out / "pretrain_digits", out / "tiny_pretrained.pt",
                            args.pretrain_epochs)
    return tiny, weights, roots


def run(params: Params, root: Path, prepared: Path, folder: Path, stages: tuple[str, ...]):
    """The stages, in `folder`; their seconds, and the last epoch's test metrics."""
    folder.mkdir(parents=True, exist_ok=True)
    seconds = {}
    with contextlib.chdir(folder):
        if "train" in stages:
            seconds["train"] = timed(lambda: train(params, root, prepared))
        if "embed" in stages:
            seconds["embed"] = timed(lambda: embed_all(params, root, prepared))
        report = []
        seconds["retrieve"] = timed(lambda: report.append(
            retrieve_all(params.retrieve, root, prepared)))
    metrics = report[0].metrics
    return seconds, metrics[max(metrics)]


def measure(name: str, base: dict, root: Path, work: Path, images_per_class: int) -> list[dict]:
    """Every lever on one data set (`base`: its params overrides), frozen and unfrozen."""
    prepared, rows = root / "prepared", []
    for frozen in (True, False):
        overrides = {**base, "train.freeze_backbone": frozen, "retrieve.picture_queries": 0}
        folder = work / f"{name}-{'frozen' if frozen else 'unfrozen'}"
        params = bench_params(overrides)
        first_seconds, baseline = run(params, root, prepared, folder / "baseline",
                                      ("train", "embed"))
        # Embed and retrieve once more: a lever's cost is compared with a warm run, not with
        # a first one that also paid for imports and thread pools.
        baseline_seconds = {"train": first_seconds["train"],
                            **run(params, root, prepared, folder / "baseline", ("embed",))[0]}
        results = {}
        # Retrieve levers first, on the baseline's embeddings; then the embed levers, each
        # re-embedding; then the sampler, in a folder of its own (it retrains).
        for lever in sorted(levers(images_per_class),
                            key=lambda l: ["", "retrieve", "embed", "train"].index(l.stage)):
            if not lever.stage:
                seconds, metrics = baseline_seconds, baseline
            else:
                where = folder / ("sampler" if lever.stage == "train" else "baseline")
                stages = {"train": ("train", "embed"), "embed": ("embed",), "retrieve": ()}
                seconds, metrics = run(bench_params({**overrides, **lever.overrides}), root,
                                       prepared, where, stages[lever.stage])
            stage = lever.stage or "train"
            mode = "frozen" if frozen else "unfrozen"
            results[lever.setting] = {
                "data": name, "backbone": mode, "lever": lever.name, "setting": lever.setting,
                **metrics, "cost": f"{stage} {seconds[stage]:.1f} s "
                                   f"({seconds[stage] / baseline_seconds[stage]:.2f}x)"}
            print(f"  done: {name}, {mode}, {lever.setting}", flush=True)
        rows += [results[lever.setting] for lever in levers(images_per_class)]
    return rows


def kreciprocal_at_competition_size() -> str:
    """k-reciprocal's seconds on the competition's test set size: 1,456 queries and 1,481
    gallery images, 512-d, clustered in 921 identities (random vectors: the cost, not accuracy)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(921, 512))
    query, gallery = (centres[rng.integers(0, 921, n)] + rng.normal(size=(n, 512))
                      for n in (1456, 1481))
    plain = timed(lambda: top_k(query, gallery, 10))
    seconds = timed(lambda: k_reciprocal_distances(query, gallery, 20, 6, 0.3, "cosine"))
    return (f"k-reciprocal at the competition's size (1456 x 1481, 512-d): {seconds:.2f} s per "
            f"epoch, exact top-10 search {plain:.3f} s; distance matrix "
            f"{(1456 + 1481) ** 2 * 4 / 2**20:.0f} MB")


def print_table(rows: list[dict]) -> None:
    print("| data | backbone | lever | setting | score | top-1 | top-5 | top-10 | mAP@10 | "
          "cost (stage seconds, x off) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['backbone']} | {r['lever']} | `{r['setting']}` | "
              f"{r['score']:.1f} | {r['top1']:.3f} | {r['top5']:.3f} | {r['top10']:.3f} | "
              f"{r['map_at_k']:.3f} | {r['cost']} |")


POST_TRAINING = {"WiSE-FT 0.5": {"embed.wise_ft_alpha": 0.5}, "flip TTA": {"embed.tta": "flip"},
                 "alpha-QE": {"retrieve.rerank": "aqe"},
                 "k-reciprocal": {"retrieve.rerank": "kreciprocal"}}


def seeded_post_training(args: argparse.Namespace) -> None:
    """The levers that act after training, on bench_accuracy.py's domains (`--domains`): each
    seed's default run (frozen and unfrozen) trains once; each lever re-embeds and re-ranks its
    open and closed test sets at the epoch the domain's own validation picked. Paired
    differences from the same epoch without the lever, mean +- 95% CI over the seeds."""
    out = args.out.resolve()
    for name in args.domains.split(","):
        domain = ba.setup_domain(name, out, ba.Sizes(), args.epochs or 8, args.pretrain_epochs)
        gains = {}  # (mode, lever, set) -> per-seed score differences
        for seed in range(args.seeds):
            roots, val_prepared = domain.make_roots(seed)
            for mode, mode_overrides in ba.MODES.items():
                overrides = {**domain.base, **domain.data, **mode_overrides, "seed": seed}
                run = ba.run_pipeline(out / "run", roots, val_prepared, ba.bench_params(overrides))
                epoch = ba.picked_epoch(run, domain.protocols[0])
                with contextlib.chdir(out / "run"):
                    for lever, lever_overrides in POST_TRAINING.items():
                        params = ba.bench_params({**overrides, **lever_overrides})
                        for test_set, root in roots.items():
                            embed_all(params, root, root / "prepared")
                            score = retrieve_all(params.retrieve, root,
                                                 root / "prepared").metrics[epoch]["score"]
                            gains.setdefault((mode, lever, test_set), []).append(
                                score - run.test[test_set][epoch])
                print(f"  done: {name}, seed {seed}, {mode}", flush=True)
        print(f"\npost-training levers on the {name} domain, default recipe, {args.seeds} seeds: "
              f"test score change at the val-picked epoch, mean ± 95% CI")
        for (mode, lever, test_set), values in gains.items():
            print(f"  {mode:9s} {lever:14s} {test_set:6s} set: {ba.mean_ci(values)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser, "/tmp/bench_levers")
    parser.add_argument("--seeded", action="store_true",
                        help="the post-training levers on bench_accuracy's domains (--domains), "
                             "several seeds (--seeds), val-picked epochs")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--domains", default="generated,digits", help="with --seeded")
    args = parser.parse_args()
    if args.seeded:
        seeded_post_training(args)
        return
    tiny, weights, roots = bench_setup(args, demo=True)
    epochs, out = tiny["train.epochs"], args.out.resolve()
    finetune_root, demo_root = roots["finetune"], roots["demo"]
    # P x K needs P classes: 5 digits to fine-tune on (4 x 16), 10 in the demo (8 x 8).
    rows = measure("accuracy", {**tiny, "model.pretrained": str(weights)}, finetune_root,
                   out / "runs", images_per_class=16)
    rows += measure("demo", {**tiny, "model.pretrained": "none"}, demo_root, out / "demo_runs",
                    images_per_class=8)
    print(f"\nlast epoch ({epochs}) test metrics; accuracy: tiny model pretrained on digits "
          f"0-4, fine-tuned on 5-9; demo: tiny random-init model, digits 0-9\n")
    print_table(rows)
    print(kreciprocal_at_competition_size())


if __name__ == "__main__":
    main()
