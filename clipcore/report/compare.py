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
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from scipy import stats

from clipcore import paths
from clipcore.errors import ClipcoreError
from clipcore.params import dotted
from clipcore.report.best import pick, read_training_metrics
from clipcore.report.recipes import dvc_overrides
from clipcore.stage import run_stage

SEED = "seed"
CONFIDENCE = 0.95
# (row label, where the value comes from, its key, decimals)
ROWS = [("val-picked epoch", "val", "epoch", 1),
        ("val score", "val", "score", 1), ("val top1", "val", "top1", 3),
        ("val map@k", "val", "map_at_k", 3),
        ("test score", "test", "score", 1), ("test top1", "test", "top1", 3),
        ("test top5", "test", "top5", 3), ("test top10", "test", "top10", 3),
        ("test map@k", "test", "map_at_k", 3)]
FINISHED = (None, "success")  # executor states of a finished experiment (None: run in place)
TRAIN_METRICS = "repository/metrics/train/metrics.json"
WIDTH = 100  # of the configuration lines
PAIRED_ROWS = [row for row in ROWS if row[2] == "score"]  # differences from A: the scores


@dataclass(frozen=True)
class Experiment:
    name: str
    params: dict              # flat dotted keys, seed included
    val: dict                 # val metrics at the picked epoch, "epoch" included
    test: dict | None         # test metrics at that epoch; None: no test labels
    picked: bool              # False: training_metrics.csv unreadable, the last epoch shown


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% Student t interval; None for a single value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    t = stats.t.ppf((1 + CONFIDENCE) / 2, df=len(values) - 1)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def exp_show(repo: Path, all_commits: bool = False) -> list:
    command = [sys.executable, "-m", "dvc", "exp", "show", "--json"]
    done = subprocess.run(command + ["--all-commits"] * all_commits, cwd=repo,
                          capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise ClipcoreError(f"dvc exp show --json failed in {repo}: {last}")
    return json.loads(done.stdout)


def read_experiments(show: list, repo: Path) -> tuple[list[Experiment], list[str]]:
    """The finished experiments of `dvc exp show --json` output, and a line for each one left
    out (queued, running, failed)."""
    found, skipped = [], []
    for baseline in show:
        for experiment in baseline.get("experiments") or []:
            run = experiment["revs"][0]
            name = experiment.get("name") or run["rev"][:7]
            state = (experiment.get("executor") or {}).get("state")
            if state not in FINISHED or run.get("error") or not run.get("data"):
                skipped.append(f"{name}: {state or 'error'}, left out")
                continue
            found.append(_experiment(name, run["rev"], run["data"], repo))
    return found, skipped


def _experiment(name: str, rev: str, data: dict, repo: Path) -> Experiment:
    params = {}
    for file, content in data["params"].items():
        prefix = "" if file == "params.yaml" else f"{file}:"
        params.update(dotted(content.get("data", {}), prefix))
    metrics = {path: content.get("data") for path, content in data["metrics"].items()}
    retrieval = metrics.get(str(paths.RETRIEVAL_METRICS)) or {}
    test_by_epoch = {int(epoch): values for epoch, values in retrieval.get("epochs", {}).items()}
    rows = _training_rows(repo, rev)
    if rows is not None:
        val = next(row for row in rows if row["epoch"] == pick(rows).epoch)
    else:  # what exp show has: the last epoch's dvclive metrics
        last = metrics.get(TRAIN_METRICS) or {}
        val = {**last, "epoch": last.get("step", math.nan)}
    return Experiment(name, params, val, test_by_epoch.get(val["epoch"]), picked=rows is not None)


def _training_rows(repo: Path, rev: str) -> list[dict] | None:
    """training_metrics.csv of an experiment's commit (a `cache: false` output: git holds it)."""
    done = subprocess.run(["git", "show", f"{rev}:./{paths.TRAINING_METRICS_CSV}"], cwd=repo,
                          capture_output=True, text=True)
    if done.returncode:
        return None
    with tempfile.TemporaryDirectory() as folder:
        table = Path(folder) / paths.TRAINING_METRICS_CSV.name
        table.write_text(done.stdout, encoding="utf-8")
        return read_training_metrics(table)


def group_by_config(experiments: list[Experiment]) -> tuple[list[str], dict[tuple, list]]:
    """The params that tell the configurations apart (seed aside), and the experiments of each
    configuration keyed by those params' values."""
    keys = sorted({key for e in experiments for key in e.params} - {SEED})
    varying = [key for key in keys if len({repr(e.params.get(key)) for e in experiments}) > 1]
    groups: dict[tuple, list] = {}
    for experiment in experiments:
        config = tuple((key, experiment.params.get(key)) for key in varying)
        groups.setdefault(config, []).append(experiment)
    for members in groups.values():
        members.sort(key=lambda e: e.params.get(SEED, 0))  # validated integers
    return varying, dict(sorted(groups.items(), key=lambda item: repr(item[0])))


def report(experiments: list[Experiment], skipped: list[str]) -> str:
    """The comparison table as text."""
    if not experiments:
        return "\n".join([*skipped, "no finished experiments (dvc exp show lists none): queue "
                          "some with `dvc exp run --queue -S seed=1,2,3 ...`, then `dvc queue start`"])
    varying, groups = group_by_config(experiments)
    names = [chr(ord("A") + i) if i < 26 else f"C{i}" for i in range(len(groups))]
    lines = textwrap.wrap(f"{len(experiments)} experiments, {len(groups)} configuration(s)"
                          + (f" differing in {', '.join(varying)}" if varying else "") + ":",
                          WIDTH, subsequent_indent="  ")
    for name, (config, members) in zip(names, groups.items()):
        seeds = ", ".join(str(e.params.get(SEED)) for e in members)
        label = " ".join(dvc_overrides(dict(config))) or "(the only configuration)"
        lines += textwrap.wrap(f"{name} (n={len(members)}; seeds {seeds}): {label}", WIDTH,
                               initial_indent="  ", subsequent_indent="      ")
    lines += _table("mean ± 95% CI", names, ROWS,
                    [[_cell(members, source, key, decimals) for _, source, key, decimals in ROWS]
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
    unpicked = [e.name for e in experiments if not e.picked]
    if unpicked:
        lines.append(f"last epoch, not val-picked (no training_metrics.csv in the commit): "
                     f"{', '.join(unpicked)}")
    return "\n".join(lines + skipped)


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
    print(report(*read_experiments(show, repo)))


if __name__ == "__main__":
    run_stage(main)
