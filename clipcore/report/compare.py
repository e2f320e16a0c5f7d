"""Compare DVC experiments run over several seeds: mean and 95% confidence interval per configuration.

    dvc exp run --queue -S seed=1,2,3,4,5 -S train.lr=0.01,0.001
    dvc queue start                  # or: dvc exp run --run-all
    python -m clipcore.report.compare

reads `dvc exp show --json`, groups the finished experiments whose params differ only in `seed`,
and prints, per configuration, the mean over its seeds with a 95% confidence interval (Student t,
n - 1 degrees of freedom; one seed gives no interval) of:
- the val metrics at the val-picked epoch (clipcore.report.best's rule, as the best stage picks), from
  the experiment's repository/metrics/training_metrics.csv in its git commit: the dvclive
  metrics.json that `dvc exp show` lists holds the last epoch only;
- the test metrics of that same epoch, where the test labels are known (the retrieve stage's
  metrics/retrieval.json, as `dvc exp show` lists it).
With several configurations it also prints each one's difference from the first (A), paired by
seed over the seeds both ran: a seed draws the same split, init and batch order for both, so
what the seed moves alike cancels out.

Only the params that can change a ranking make configurations (clipcore.report.experiments.RUN_ONLY:
submit.*, report.*, workers, resuming are listed apart, not counted); a seed run twice with the same
params counts once. mAP@k of configurations with different k (train.val_top_k, retrieve.top_k)
carry their k. The header lists every param (seed aside) that differs from HEAD's params.yaml:
queued experiments start from the workspace's params, uncommitted changes included. By default
only the experiments of HEAD count; -A takes those of every commit (whose code may differ).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path

from scipy import stats

from clipcore.errors import ClipcoreError
from clipcore.report.experiments import (
    SEED,
    Experiment,
    exp_show,
    finished,
    head_params,
    is_recipe,
    read_experiments,
)
from clipcore.report.recipes import dvc_overrides
from clipcore.stage import run_stage

CONFIDENCE = 0.95
# (row label, where the value comes from, its key, decimals)
ROWS = [("val-picked epoch", "val", "epoch", 1),
        ("val score", "val", "score", 1), ("val top1", "val", "top1", 3),
        ("val map@k", "val", "map_at_k", 3),
        ("test score", "test", "score", 1), ("test top1", "test", "top1", 3),
        ("test top5", "test", "top5", 3), ("test top10", "test", "top10", 3),
        ("test map@k", "test", "map_at_k", 3)]
MAP_K = {"map_at_k": {"val": "train.val_top_k", "test": "retrieve.top_k"}}  # each mAP's k
WIDTH = 100  # of the configuration lines
PAIRED_ROWS = [row for row in ROWS if row[2] == "score"]  # differences from A: the scores


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% Student t interval; None for a single value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    t = stats.t.ppf((1 + CONFIDENCE) / 2, df=len(values) - 1)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


@dataclass(frozen=True)
class Grouping:
    varying: list[str]        # the recipe params that tell the configurations apart
    run_only: list[str]       # params that differ too but change no ranking (not counted)
    groups: dict[tuple, list[Experiment]]  # by those params' values, one experiment per seed
    repeats: list[str]        # a line for each seed run again with the same params


def group_by_config(experiments: list[Experiment]) -> Grouping:
    """The experiments by configuration (their recipe params, seed aside), each seed once."""
    keys = sorted({key for e in experiments for key in e.params} - {SEED})
    differ = [key for key in keys if len({repr(e.params.get(key)) for e in experiments}) > 1]
    varying = [key for key in differ if is_recipe(key)]
    groups: dict[tuple, list] = {}
    for experiment in experiments:
        config = tuple((key, experiment.params.get(key)) for key in varying)
        groups.setdefault(config, []).append(experiment)
    repeats = []
    for config, members in groups.items():
        by_seed: dict = {}
        for experiment in members:
            by_seed.setdefault(experiment.params.get(SEED), []).append(experiment)
        for seed, runs in by_seed.items():
            if len(runs) > 1:
                repeats.append(f"seed {seed} ran {len(runs)} times with the same params "
                               f"({', '.join(e.name for e in runs)}): counted once, as "
                               f"{runs[0].name}")
        groups[config] = sorted((runs[0] for runs in by_seed.values()),
                                key=lambda e: e.params.get(SEED, 0))  # validated integers
    return Grouping(varying, [key for key in differ if not is_recipe(key)],
                    dict(sorted(groups.items(), key=lambda item: repr(item[0]))), repeats)


def against_head(experiments: list[Experiment], head: dict | None) -> list[str]:
    """A line per param (seed aside) whose value in some experiment is not HEAD's params.yaml's."""
    if head is None:
        return ["HEAD has no params.yaml: the params cannot be checked against the commit"]
    keys = sorted({key for e in experiments for key in e.params if ":" not in key} - {SEED})
    lines = []
    for key in keys:
        values = [e.params.get(key) for e in experiments if e.params.get(key) != head.get(key)]
        if values:
            counts = {repr(v): (v, values.count(v)) for v in values}
            found = ", ".join(f"{_yaml(v)} in {n} of {len(experiments)}"
                              for v, n in counts.values())
            lines.append(f"  {key}: {found} (HEAD: "
                         f"{_yaml(head[key]) if key in head else 'no such key'})")
    if not lines:
        return ["every param as in HEAD's params.yaml (seed aside)"]
    return ["params that differ from HEAD's params.yaml (queued runs take the workspace's, "
            "uncommitted too):", *lines]


def report(experiments: list[Experiment], skipped: list[str], head: dict | None = None,
           elsewhere: int = 0) -> str:
    """The comparison table as text; `head`: HEAD's params (dotted), `elsewhere`: finished
    experiments of other commits, left out (no -A)."""
    hint = [f"{elsewhere} finished experiment(s) of earlier commits left out: add -A "
            f"(--all-commits) to compare them (their code may differ from HEAD's)"] * bool(elsewhere)
    if not experiments:
        return "\n".join([*skipped, *hint, "no finished experiments (dvc exp show lists "
                          "none): queue some with `dvc exp run --queue -S seed=1,2,3 ...`, then "
                          "`dvc queue start`"])
    grouping = group_by_config(experiments)
    varying, groups = grouping.varying, grouping.groups
    names = [chr(ord("A") + i) if i < 26 else f"C{i}" for i in range(len(groups))]
    counted = sum(len(members) for members in groups.values())
    commits = sorted({e.baseline for e in experiments})
    lines = textwrap.wrap(f"{counted} experiments"
                          + (f" (of {len(commits)} commits: {', '.join(commits)})"
                             if len(commits) > 1 else "")
                          + f", {len(groups)} configuration(s)"
                          + (f" differing in {', '.join(varying)}" if varying else "") + ":",
                          WIDTH, subsequent_indent="  ")
    for name, (config, members) in zip(names, groups.items()):
        seeds = ", ".join(str(e.params.get(SEED)) for e in members)
        label = " ".join(dvc_overrides(dict(config))) or "(the only configuration)"
        lines += textwrap.wrap(f"{name} (n={len(members)}; seeds {seeds}): {label}", WIDTH,
                               initial_indent="  ", subsequent_indent="      ")
    lines += against_head(experiments, head)
    if grouping.run_only:
        lines.append(f"differ too, not counted as configurations (they change no ranking): "
                     f"{', '.join(grouping.run_only)}")
    k_differs = _k_differs(groups)
    lines += _table("mean ± 95% CI", names, ROWS,
                    [[_cell(members, source, key, decimals)
                      + (f" @{members[0].params.get(MAP_K[key][source])}"
                         if (source, key) in k_differs else "")
                      for _, source, key, decimals in ROWS]
                     for members in groups.values()])
    if len(groups) > 1:
        reference, *others = groups.values()
        lines += _table("minus A, by seed", names[1:], PAIRED_ROWS,
                        [[_paired_cell(reference, members, source, key, decimals)
                          for _, source, key, decimals in PAIRED_ROWS] for members in others])
    lines += ["", "val-picked epoch: the highest val score (clipcore.report.best, as the best stage); "
              "test: that epoch's test metrics (retrieval.json).",
              "95% CI: mean ± t(0.975, n-1) * sd / sqrt(n) over the seeds; n=1: no interval."]
    if len(groups) > 1:
        lines.append("minus A, by seed: each seed's score minus A's run of the same seed, over "
                     "the seeds both ran (n); an interval without 0 is a real difference.")
    if k_differs:
        lines.append("@N: the k of that mAP@k (train.val_top_k, retrieve.top_k), which differs "
                     "between configurations: those cells do not compare")
    unpicked = [e.name for e in experiments if not e.picked]
    if unpicked:
        lines.append(f"last epoch, not val-picked (no training_metrics.csv in the commit): "
                     f"{', '.join(unpicked)}")
    return "\n".join(lines + grouping.repeats + skipped + hint)


def _k_differs(groups: dict[tuple, list[Experiment]]) -> set[tuple[str, str]]:
    """The (source, metric) pairs of ROWS whose k is not the same in every configuration."""
    return {(source, key) for key, sources in MAP_K.items() for source, k_key in sources.items()
            if len({repr(members[0].params.get(k_key)) for members in groups.values()}) > 1}


def _yaml(value) -> str:
    return json.dumps(value) if isinstance(value, (bool, str)) or value is None else str(value)


def _table(title: str, names: list[str], rows: list[tuple], columns: list[list[str]]) -> list[str]:
    """A blank line, then the table's lines: a column per configuration, a line per row."""
    width = max(len(cell) for column in columns for cell in column) + 2
    lines = ["", f"{title:20s}" + "".join(f"{n:>{width}s}" for n in names)]
    for i, (label, *_) in enumerate(rows):
        lines.append(f"{label:20s}" + "".join(f"{column[i]:>{width}s}" for column in columns))
    return lines


def _values(members: list[Experiment], source: str, key: str) -> list[tuple[object, float]]:
    """(seed, value) of each experiment that has the val or test metric `key`."""
    found = [(e.params.get(SEED), (getattr(e, source) or {}).get(key)) for e in members]
    return [(seed, float(v)) for seed, v in found if v is not None and not math.isnan(float(v))]


def _cell(members: list[Experiment], source: str, key: str, decimals: int) -> str:
    values = [value for _, value in _values(members, source, key)]
    if not values:
        return "-"
    mean, half = mean_ci(values)
    spread = f" (n={len(values)})" if half is None else f" ± {half:.{decimals}f}"
    missing = "" if len(values) == len(members) else f" [{len(values)} of {len(members)}]"
    return f"{mean:.{decimals}f}{spread}{missing}"


def _paired_cell(reference: list[Experiment], members: list[Experiment], source: str,
                 key: str, decimals: int) -> str:
    """The mean ± 95% CI of members' value minus the reference's, seed by seed."""
    base, other = dict(_values(reference, source, key)), dict(_values(members, source, key))
    differences = [other[seed] - base[seed] for seed in sorted(set(base) & set(other))]
    if not differences:
        return "- (no common seed)"
    mean, half = mean_ci(differences)
    spread = "" if half is None else f" ± {half:.{decimals}f}"
    return f"{mean:+.{decimals}f}{spread} (n={len(differences)})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clipcore.report.compare",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".", help="the DVC project (default: %(default)s)")
    parser.add_argument("-A", "--all-commits", action="store_true",
                        help="experiments of every commit, not only of the current one")
    parser.add_argument("--show-json", metavar="FILE",
                        help="saved `dvc exp show --json` output instead of running it")
    args = parser.parse_args(argv)
    repo = Path(args.repo)
    if args.show_json:
        try:
            show = json.loads(Path(args.show_json).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ClipcoreError(f"{args.show_json}: cannot read dvc exp show output ({exc})") from None
    else:
        show = exp_show(repo, args.all_commits)
    experiments, skipped = read_experiments(show, repo)
    elsewhere = 0
    if not experiments and not args.all_commits and not args.show_json:
        elsewhere = len(finished(exp_show(repo, all_commits=True)))
    print(report(experiments, skipped, head_params(repo), elsewhere))


if __name__ == "__main__":
    run_stage(main)
