"""One self-contained HTML page per run (repository/report.html), written from the files the
earlier stages left (training_metrics.csv, retrieval.json, best/, the results' pictures, the test
images), so it rebuilds without retraining. Charts are inline SVG and pictures base64 data URIs:
it opens offline, in any browser, with no script and no CDN.

It shows the val and test metrics by epoch with the val-picked best epoch marked; for the best
epoch, the queries it gets most wrong with their top matches and the class pairs most often
confused (where the test labels are known); and the params that differ from the committed
params.yaml (git HEAD).
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml
from PIL import Image

from clipcore import paths
from clipcore.data.images import UnreadableImage, load_rgb
from clipcore.data.manifests import labels_by_name, read_manifest
from clipcore.errors import ClipcoreError
from clipcore.files import write_text_atomic
from clipcore.params import ParamsError, ReportParams, dotted, parse_params
from clipcore.report.best import (
    MADE_BY,
    read_summary,
    read_test_metrics,
    read_training_metrics,
)
from clipcore.report.charts import by_epoch_charts, escape, fmt, metrics_table
from clipcore.report.crops import crop_section
from clipcore.report.versus_base import verdict
from clipcore.retrieve.pictures import MAX_MATCHES, QUERY_FRAME, RIGHT, WRONG

THUMB = 64                # pixels: thumbnails are downscaled, 1-2 kB each
JPEG_QUALITY = 80
CONFUSED_PAIRS = 10       # rows of the confusion table


@dataclass(frozen=True)
class Outcome:
    """How one query fared: rank of its first right match (None: none in the list), hits."""
    query: str
    first_right: int | None
    hits: int


@dataclass(frozen=True)
class Confusion:
    query_class: str
    returned_class: str
    count: int
    example: str          # a query of query_class whose first match has returned_class


def write_report(report: ReportParams, data_root: Path, prepared: Path = paths.PREPARED,
                 committed: tuple[str, dict] | None = None) -> Path:
    """Write paths.REPORT; `committed` is (revision, params dict) to compare with, if any."""
    rows = read_training_metrics()
    test = read_test_metrics()
    summary = read_summary()
    try:
        ranking = json.loads(paths.BEST_RESULTS.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ClipcoreError(f"{paths.BEST_RESULTS}: unreadable ({exc}; run `dvc repro best`)") \
            from None
    query, gallery = (read_manifest(prepared, split) for split in ("query", "gallery"))
    images = {PurePosixPath(p).name: Path(data_root) / p
              for frame in (query, gallery) for p in frame["path"]}
    named = {*ranking, *(match for matches in ranking.values() for match in matches)}
    unknown = sorted(named - set(images))
    if unknown:
        raise ClipcoreError(f"{paths.BEST_RESULTS}: {unknown[0]} is in no manifest of {prepared} "
                            f"(stale results: run `dvc repro`)")
    queries = {PurePosixPath(p).name for p in query["path"]}
    mixed = next(((q, m) for q, matches in ranking.items() for m in matches if m in queries), None)
    if mixed:  # the page looks a match up among the gallery's labels
        raise ClipcoreError(f"{paths.BEST_RESULTS}: {mixed[1]}, a query, is listed as a match of "
                            f"{mixed[0]}; matches are gallery images (results made elsewhere?)")
    labels = labels_by_name(query), labels_by_name(gallery)
    thumbnails = Thumbnails(images)
    best = summary["epoch"]
    sections = [
        _header(summary, rows),
        by_epoch_charts(rows, test, best),
        metrics_table(rows, test, best),
        _mistakes(ranking, *labels, report.worst_queries, thumbnails),
        _picture(best),
        *filter(None, [crop_section(paths.CROP_REPORT, paths.CROPPED, Thumbnails)]),
        _params_section(summary["params"], committed),
        _data_section(summary),
    ]
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>clipcore run report: best epoch {best}</title><style>{STYLE}</style></head>"
            f"<body>\n" + "\n".join(sections) + "\n</body></html>\n")
    return write_text_atomic(paths.REPORT, page)


def outcomes(ranking: dict[str, list[str]], query_labels: dict[str, str],
             gallery_labels: dict[str, str]) -> list[Outcome]:
    """Every query's outcome, most wrong first: no right match in the list, then the first right
    match furthest down, then the fewest right matches; ties in results order."""
    found = []
    for name, matches in ranking.items():
        right = [gallery_labels[m] == query_labels[name] for m in matches]
        first = right.index(True) + 1 if any(right) else None
        found.append(Outcome(name, first, sum(right)))
    worst_rank = max((len(m) for m in ranking.values()), default=0) + 1
    return sorted(found, key=lambda o: (-(o.first_right or worst_rank), o.hits))


def confusions(ranking: dict[str, list[str]], query_labels: dict[str, str],
               gallery_labels: dict[str, str]) -> list[Confusion]:
    """(query class, class of its first match) pairs where the two differ, most frequent first;
    ties in the order they first occur."""
    counts, examples = Counter(), {}
    for name, matches in ranking.items():
        pair = (query_labels[name], gallery_labels[matches[0]]) if matches else None
        if pair and pair[0] != pair[1]:
            counts[pair] += 1
            examples.setdefault(pair, name)
    return [Confusion(*pair, count, examples[pair]) for pair, count in counts.most_common()]


def committed_params(path: Path = Path("params.yaml")) -> tuple[str, dict] | None:
    """(short revision, params dict) of params.yaml at git HEAD; None outside git or before the
    first commit of the file. Sets the baseline of "what this run changed"."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout
    try:
        revision = git("rev-parse", "--short", "HEAD").strip()
        raw = yaml.safe_load(git("show", f"HEAD:./{path.as_posix()}"))
    except (OSError, subprocess.CalledProcessError, yaml.YAMLError):
        return None
    return (revision, raw) if isinstance(raw, dict) else None


def params_changes(run: dict, committed: dict) -> list[tuple[str, object, object]]:
    """(dotted key, committed value, this run's value) for every key of `run`'s sections
    whose value differs; the committed file is read as the stages read it where it still
    validates (`1e-2`, a string to PyYAML, and 0.01 are the same value)."""
    try:
        committed = dataclasses.asdict(parse_params(committed))
    except ParamsError:  # an older schema: compare what is there
        pass
    before, after = dotted(committed), dotted(run)
    return [(key, before.get(key, "(absent)"), value) for key, value in after.items()
            if before.get(key, "(absent)") != value]


class Thumbnails:
    """Data URIs of downscaled test images by base name, each encoded once."""

    def __init__(self, images: dict[str, Path]):
        self.images, self.cache = images, {}

    def __call__(self, name: str) -> str:
        if name not in self.cache:
            try:
                image = load_rgb(self.images[name])
                image.thumbnail((THUMB, THUMB))  # never enlarged: the browser scales up for free
            except UnreadableImage:
                image = Image.new("RGB", (THUMB, THUMB), (160, 160, 160))
            self.cache[name] = _data_uri(image)
        return self.cache[name]


def _header(summary: dict, rows: list[dict]) -> str:
    epoch, val, test = summary["epoch"], summary["val"], summary["test"]
    measured = [f"val score {fmt(val['score'], 1)}" if val["score"] is not None else
                "no val metrics"]
    measured.append(f"test score {test['score']:.1f}/1000 on {test['queries']} queries"
                    if test else "test labels unknown (no test metrics)")
    return (f"<h1>Run report</h1>\n<p class=\"summary\">Best epoch <b id=\"best-epoch\">{epoch}"
            f"</b> of {rows[0]['epoch']}..{rows[-1]['epoch']}, picked by: "
            f"{escape(summary['picked_by'])}"
            f". {escape('; '.join(measured))}.<br>Its model: <code>repository/best/"
            f"{escape(summary['model'])}</code> (DVC artifact <code>best-model</code>), its results: "
            f"<code>repository/best/{escape(summary['results'])}</code>.</p>\n"
            f"<p class=\"versus-base\" id=\"versus-base\">"
            f"{escape(verdict(summary.get('versus_base')))}.</p>")


def _mistakes(ranking: dict[str, list[str]], query_labels: dict[str, str] | None,
              gallery_labels: dict[str, str] | None, count: int, thumbnails: Thumbnails) -> str:
    title = "<h2 id=\"worst\">What the best epoch gets most wrong</h2>\n"
    if query_labels is None or gallery_labels is None:
        return (title + "<p class=\"note\">The test labels are unknown here (as on the "
                "competition's test set): right and wrong matches, worst queries and confused "
                "classes need them.</p>")
    found = outcomes(ranking, query_labels, gallery_labels)
    missed = sum(o.first_right is None for o in found)
    wrong_first = sum(o.first_right != 1 for o in found)
    shown = (f" The {min(count, len(found))} worst, most wrong first (frame: <span class="
             f"\"right\">right class</span> / <span class=\"wrong\">wrong class</span>):"
             if count else "")
    parts = [title, f"<p>{wrong_first} of {len(found)} queries have a wrong first match; "
             f"{missed} have no right match among their {escape(_list_length(ranking))}.{shown}</p>"]
    for outcome in found[:count]:
        label = query_labels[outcome.query]
        where = ("no right match" if outcome.first_right is None
                 else f"first right match at rank {outcome.first_right}")
        tiles = [_tile(thumbnails(outcome.query), f"query, class {label}", "query")]
        for match in ranking[outcome.query][:MAX_MATCHES]:
            right = gallery_labels[match] == label
            tiles.append(_tile(thumbnails(match), f"class {gallery_labels[match]}",
                               "right" if right else "wrong"))
        parts.append(f"<div class=\"row worst\" data-query=\"{escape(outcome.query)}\" "
                     f"data-first-right=\"{outcome.first_right or ''}\"><div class=\"label\">"
                     f"<code>{escape(outcome.query)}</code><br>class {escape(label)}: {where}</div>"
                     + "".join(tiles) + "</div>")
    pairs = confusions(ranking, query_labels, gallery_labels)[:CONFUSED_PAIRS]
    per_class = Counter(query_labels[q] for q in ranking)
    parts.append("<h2 id=\"confused\">Class pairs most often confused</h2>\n")
    if not pairs:
        return "".join(parts) + "<p>Every query's first match has its class.</p>"
    parts.append("<table id=\"confusions\"><tr><th>query class</th><th>first match's class</th>"
                 "<th>queries</th><th>example: query, first match</th></tr>")
    for pair in pairs:
        example = ranking[pair.example][0]
        parts.append(f"<tr data-pair=\"{escape(pair.query_class)}|{escape(pair.returned_class)}\" "
                     f"data-count=\"{pair.count}\"><td>{escape(pair.query_class)}</td>"
                     f"<td>{escape(pair.returned_class)}</td><td>{pair.count} of "
                     f"{per_class[pair.query_class]}</td><td>"
                     f"{_tile(thumbnails(pair.example), pair.example, 'query')}"
                     f"{_tile(thumbnails(example), example, 'wrong')}</td></tr>")
    return "".join(parts) + "</table>"


def _picture(epoch: int) -> str:
    """The retrieve stage's picture of the best epoch (the same queries in every epoch)."""
    path = paths.picture_path(epoch)
    if not path.is_file():
        return ""
    try:
        picture = _data_uri(load_rgb(path))
    except UnreadableImage as exc:  # a damaged picture costs the report this section only
        return f"<p class=\"note\">The retrieve stage's picture is unreadable: {escape(exc)}</p>"
    return (f"<h2 id=\"picture\">The retrieve stage's picture of epoch {epoch}</h2>\n"
            f"<p class=\"note\">Evenly spaced queries, the same in every epoch's picture "
            f"(<code>{escape(path.as_posix())}</code>).</p><img class=\"picture\" src=\"{picture}\" "
            f"alt=\"retrieval results of epoch {epoch}\">")


def _params_section(run: dict, committed: tuple[str, dict] | None) -> str:
    title = "<h2 id=\"params\">Params that differ from the committed params.yaml</h2>\n"
    if committed is None:
        return (title + "<p class=\"note\">No committed params.yaml to compare with (not a git "
                "repository, or params.yaml not committed yet).</p>")
    revision, raw = committed
    changes = params_changes(run, raw)
    intro = (f"<p class=\"note\">This run against params.yaml at git HEAD ({escape(revision)}) when "
             f"the report was written; the sections that make the model and its results "
             f"({', '.join(MADE_BY)}).</p>")
    if not changes:
        return title + intro + "<p id=\"no-changes\">None: this run used the committed params.</p>"
    body = "".join(f"<tr data-key=\"{escape(key)}\"><td><code>{escape(key)}</code></td><td>"
                   f"{escape(json.dumps(old))}</td><td>{escape(json.dumps(new))}</td></tr>"
                   for key, old, new in changes)
    return (title + intro + "<table id=\"changes\"><tr><th>key</th><th>committed</th>"
            "<th>this run</th></tr>" + body + "</table>")


def _data_section(summary: dict) -> str:
    data = summary["data"]
    rows = "".join(f"<tr><td><code>{escape(name)}</code></td><td><code>{escape(digest[:16])}</code></td>"
                   f"</tr>" for name, digest in data["manifests_sha256"].items())
    return (f"<h2 id=\"data\">Data</h2>\n<p>Data root <code>{escape(data['root'])}</code>; the "
            f"manifests that made this run (sha256, first 16 digits; full digests in "
            f"<code>repository/best/summary.json</code>):</p><table>{rows}</table>"
            f"<p class=\"note\">Written by <code>dvc repro report</code> from the metrics files, "
            f"<code>repository/best/</code> and the test images; it rebuilds without "
            f"retraining.</p>")


def _tile(uri: str, title: str, kind: str) -> str:
    return f"<img class=\"tile {kind}\" src=\"{uri}\" title=\"{escape(title)}\" alt=\"{escape(title)}\">"


def _data_uri(image: Image.Image) -> str:
    """The image as a PNG or a JPEG data URI, whichever is smaller (photos: JPEG, by far;
    small flat images such as the demo's digits: PNG)."""
    encoded = []
    for kind in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        image.save(buffer, format=kind, quality=JPEG_QUALITY, optimize=True)
        encoded.append(f"data:image/{kind.lower()};base64,"
                       + base64.b64encode(buffer.getvalue()).decode("ascii"))
    return min(encoded, key=len)


def _list_length(ranking: dict[str, list[str]]) -> str:
    lengths = {len(m) for m in ranking.values()}
    return f"top {lengths.pop()}" if len(lengths) == 1 else "ranked lists"


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1180px}
h1{margin:0 0 8px}h2{margin:28px 0 8px;font-size:1.2em}
.summary{font-size:1.05em}.note{color:#555;font-size:.9em}
code{background:#f3f3f3;padding:0 3px}
.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart .title{font-size:13px;font-weight:600}.chart .tick{font-size:11px;fill:#444}
.chart .grid{stroke:#e3e3e3}.chart .best{stroke:#222;stroke-dasharray:4 3}
.chart .best-label{font-size:11px;paint-order:stroke;stroke:#fff;stroke-width:3px}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
tr.best td{background:#fff4c2;font-weight:600}
.row{display:flex;align-items:center;gap:3px;margin:4px 0}
.row .label{width:170px;font-size:.8em;overflow-wrap:anywhere}
.tile{width:64px;height:64px;object-fit:contain;border:3px solid #fff;background:#fff}
.picture{max-width:100%}
"""
# The tiles' frames in clipcore.retrieve.pictures' colours, so that the report and the pictures agree.
STYLE += "".join(f".tile.{kind}{{border-color:#{r:02x}{g:02x}{b:02x}}}"
                 f"span.{kind}{{color:#{r:02x}{g:02x}{b:02x};font-weight:600}}"
                 for kind, (r, g, b) in (("query", QUERY_FRAME), ("right", RIGHT),
                                         ("wrong", WRONG)))
