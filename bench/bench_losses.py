"""The losses of `loss.name` compared on bench_accuracy.py's harness: each loss's main knob tuned
on validation only, then every loss over several seeds, frozen and unfrozen, on the generated
(competition-shaped) domain and the digits, open and closed set; test score at the epoch the
validation picks, paired against the CLIP loss (the default) per seed, mean ± 95% CI; seconds
per training epoch.

Tuning: each knob value in LOSSES, frozen, on the first `--tune-seeds` seeds; the value with the
highest mean best-val score (the domain's own protocol: class split on the generated domain,
image split on the digits) is kept for that domain. The test split chooses nothing. The
tuning runs of the kept value are the first seeds' frozen runs of the comparison (the same
params and seed give the same run), so they are not run twice.

Pair losses need positives in a batch: they run with class-balanced P x K batches
(`train.sampler: class_balanced`; K = 4 on the generated domain, 32 on the digits, which
fine-tune on 3 classes). So does the extra row "clip + class-balanced", the CLIP loss on the
same batches: it tells the sampler's effect from the loss's.

    OMP_NUM_THREADS=1 python bench/bench_losses.py [--domains generated] [--seeds 5]
        [--tune-seeds 3] [--epochs 8] [--out /tmp/bench_losses]

`--cost-rounds 3` instead times each loss's unfrozen epochs (params.yaml's knobs) afresh, in
interleaved rounds: run it on a quiet machine, with an --out of its own (the base it pretrains
does not matter to the time: `--pretrain-epochs 1`).

Finished runs are appended to <out>/<domain>_runs.jsonl and reused by a rerun with the same
--out (delete it to start over). Run one process per domain on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_accuracy as ba  # noqa: E402  (same folder)
from clipcore.params import PAIR_LOSSES  # noqa: E402

# loss -> (its main knob, the values tried on validation, params.yaml's among them). A value
# that wins at the edge of its range gets a neighbour beyond it (multi-similarity's 0.85).
LOSSES: dict[str, tuple[str, tuple] | None] = {
    "clip": None,  # the default, as params.yaml has it
    "clip + class-balanced": None,
    "arcface": ("loss.arcface.margin", (11.5, 20.0, 28.6)),  # degrees; MLRC tuned 18.6-23.2
    "subcenter_arcface": ("loss.subcenter_arcface.margin", (11.5, 20.0, 28.6)),
    "cosface": ("loss.cosface.margin", (0.2, 0.35, 0.5)),  # MLRC tuned 0.34-0.62
    "supcon": ("loss.supcon.temperature", (0.05, 0.1, 0.2)),
    "triplet": ("loss.triplet.margin", (0.05, 0.1, 0.2)),  # MLRC tuned 0.045-0.119; the seed 0.2
    "multi_similarity": ("loss.multi_similarity.base", (0.3, 0.5, 0.7, 0.85)),
}
IMAGES_PER_CLASS = {"generated": 4, "digits": 32}


def row_overrides(row: str, domain: str, knob_value=None) -> dict:
    """params overrides of a row (a loss, with its knob at knob_value; None: params.yaml's)."""
    loss = row.split(" + ")[0]
    overrides = {"loss.name": loss}
    if knob_value is not None:
        overrides[LOSSES[row][0]] = knob_value
    if loss in PAIR_LOSSES or row.endswith("class-balanced"):
        overrides.update({"train.sampler": "class_balanced",
                          "train.images_per_class": IMAGES_PER_CLASS[domain]})
    return overrides


class Runs:
    """Finished runs by (overrides, mode, seed), kept in a JSON-lines file so a rerun resumes."""

    def __init__(self, file: Path, domain: ba.Domain, work: Path):
        self.file, self.domain, self.work = file, domain, work
        self.done: dict[str, ba.Run] = {}
        self.roots: dict[int, tuple] = {}
        if file.exists():
            for line in file.read_text().splitlines():
                entry = json.loads(line)
                run = ba.Run(**entry["run"])
                run.val = {p: {int(e): s for e, s in v.items()} for p, v in run.val.items()}
                run.test = {t: {int(e): s for e, s in v.items()} for t, v in run.test.items()}
                self.done[entry["key"]] = run

    def get(self, overrides: dict, mode: str, seed: int) -> ba.Run:
        """The finished run of these params, run now if there is none."""
        key = json.dumps([sorted(overrides.items()), mode, seed])
        if key not in self.done:
            self.done[key] = self.run(overrides, mode, seed)
            with self.file.open("a") as out:
                out.write(json.dumps({"key": key, "run": asdict(self.done[key])}) + "\n")
        return self.done[key]

    def run(self, overrides: dict, mode: str, seed: int) -> ba.Run:
        if seed not in self.roots:
            self.roots[seed] = self.domain.make_roots(seed)
        roots, val_prepared = self.roots[seed]
        params = ba.bench_params({**self.domain.base, **overrides, **ba.MODES[mode],
                                  **self.domain.data, "seed": seed})
        run = ba.run_pipeline(self.work, roots, val_prepared, params)
        print(f"  done: {self.domain.name} {overrides} {mode} seed {seed} ({run.seconds:.0f} s)",
              flush=True)
        return run


def tune(runs: Runs, domain: str, protocol: str, seeds: range) -> dict[str, object]:
    """Each loss's knob value with the highest mean best-val score over the tuning seeds."""
    chosen = {}
    print(f"\n{domain}: knob tuning on validation ({protocol}, frozen, seeds "
          f"{seeds.start}..{seeds.stop - 1}): mean best val score")
    for row, knob in LOSSES.items():
        if knob is None:
            continue
        key, values = knob
        means = {v: np.mean([max(runs.get(row_overrides(row, domain, v), "frozen", s)
                                 .val[protocol].values()) for s in seeds]) for v in values}
        chosen[row] = max(means, key=means.get)
        print(f"  {row:22s} {key} " + ", ".join(f"{v}: {m:.1f}" for v, m in means.items())
              + f" -> {chosen[row]}", flush=True)
    return chosen


def compare(runs: Runs, domain: str, protocol: str, chosen: dict, seeds: range,
            modes: list[str]) -> None:
    """Per test set and mode: each loss's val-picked test score, its paired difference from the
    CLIP loss, and seconds per epoch against the CLIP loss's."""
    table = {(row, mode): [runs.get(row_overrides(row, domain, chosen.get(row)), mode, s)
                           for s in seeds] for mode in modes for row in LOSSES}
    for test_set in ba.SETS:
        for mode in modes:
            clip = table[("clip", mode)]
            clip_picked = [ba.picked(r, protocol, test_set) for r in clip]
            clip_seconds = np.mean([r.epoch_seconds for r in clip])
            print(f"\n{domain}, {test_set} set, {mode}: test score at the epoch {protocol} "
                  f"picks, mean ± 95% CI over {len(seeds)} seeds; epoch 0: "
                  f"{ba.mean_ci([r.test[test_set][0] for r in clip])}")
            for row in LOSSES:
                rs = table[(row, mode)]
                scores = [ba.picked(r, protocol, test_set) for r in rs]
                knob = "" if row not in chosen else f"{LOSSES[row][0].split('.')[-1]} {chosen[row]}"
                seconds = np.mean([r.epoch_seconds for r in rs])
                print(f"  {row:22s} {knob:14s} {ba.mean_ci(scores)} | vs clip (paired): "
                      f"{ba.mean_ci(np.subtract(scores, clip_picked))} | best val "
                      f"{ba.mean_ci([max(r.val[protocol].values()) for r in rs])} | "
                      f"{seconds:.2f} s/epoch ({seconds / clip_seconds:.2f}x clip)", flush=True)


def cost(runs: Runs, domain: str, rounds: int) -> None:
    """Seconds per training epoch of each loss, unfrozen (the backbone's backward pass included),
    timed afresh in interleaved rounds on seed 0, so that a change of machine load hits every
    loss alike; the median round. (The comparison's s/epoch come from runs made under whatever
    load there was.)"""
    seconds: dict[str, list[float]] = {row: [] for row in LOSSES}
    for _ in range(rounds):
        for row in LOSSES:
            overrides = row_overrides(row, domain)
            seconds[row].append(runs.run(overrides, "unfrozen", 0).epoch_seconds)
    clip = np.median(seconds["clip"])
    print(f"\n{domain}: seconds per training epoch, unfrozen, median of {rounds} interleaved "
          f"rounds")
    for row, values in seconds.items():
        print(f"  {row:22s} {np.median(values):.2f} s ({np.median(values) / clip:.2f}x clip)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", default="generated,digits")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--tune-seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--modes", default="frozen,unfrozen")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_losses"))
    parser.add_argument("--cost-rounds", type=int, default=0,
                        help="only time each loss's epochs (unfrozen, seed 0) in this many rounds")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in args.domains.split(","):
        domain = ba.setup_domain(name, out, ba.Sizes(), args.epochs, args.pretrain_epochs)
        protocol = domain.protocols[0]  # the pipeline's own: what a user's dvc exp shows
        runs = Runs(out / f"{name}_runs.jsonl", domain, out / f"{name}_run")
        if args.cost_rounds:
            cost(runs, name, args.cost_rounds)
            continue
        chosen = tune(runs, name, protocol, range(args.tune_seeds))
        compare(runs, name, protocol, chosen, range(args.seeds), args.modes.split(","))


if __name__ == "__main__":
    main()
