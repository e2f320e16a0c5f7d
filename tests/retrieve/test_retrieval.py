"""The retrieve stage on hand-made embeddings with answers worked out by hand: result files,
metrics, pictures, unknown labels, stale embeddings, and the stage script itself."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_params
from PIL import Image

from clipcore import paths
from clipcore.data.manifests import read_manifest
from clipcore.errors import ClipcoreError
from clipcore.model.checkpoint import save_model
from clipcore.model.factory import build_model
from clipcore.retrieve import pictures
from clipcore.retrieve.embedding import embed_all
from clipcore.retrieve.retrieval import retrieve_all
from clipcore.train.training import train

REPO = Path(__file__).resolve().parents[2]

# Manifest order is deliberately not alphabetical: it must survive end to end.
GALLERY = [("zeta.png", "A", [1.0, 0.0, 0.0]),
           ("alpha.png", "B", [0.0, 1.0, 0.0]),
           ("mid.png", "A", [0.8, 0.6, 0.0]),
           ("beta.png", "B", [0.0, 0.0, 1.0])]
QUERIES = ["q_zz.png", "q_aa.png", "q_mm.png"]
QUERY_LABELS = ["A", "B", "A"]
# Epoch 0: cosine rankings (ties by gallery order)
#   q_zz [1, 0, 0]:     zeta 1, mid .8, alpha 0, beta 0  -> zeta mid alpha   (hit at 1)
#   q_aa [.6, .8, 0]:   mid .96, alpha .8, zeta .6       -> mid alpha zeta   (first hit at 2)
#   q_mm [0, 0, 1]:     beta 1, then zeta alpha mid 0    -> beta zeta alpha  (first hit at 2)
EPOCH0 = [[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]
# Epoch 1: every query's best match has its class.
#   q_zz -> zeta mid alpha; q_aa [0, 1, 0] -> alpha mid zeta; q_mm [1, 0, 0] -> zeta mid alpha
EPOCH1 = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
RANKINGS = {0: {"q_zz.png": ["zeta.png", "mid.png", "alpha.png"],
                "q_aa.png": ["mid.png", "alpha.png", "zeta.png"],
                "q_mm.png": ["beta.png", "zeta.png", "alpha.png"]},
            1: {"q_zz.png": ["zeta.png", "mid.png", "alpha.png"],
                "q_aa.png": ["alpha.png", "mid.png", "zeta.png"],
                "q_mm.png": ["zeta.png", "mid.png", "alpha.png"]}}
# k = 3; two relevant gallery images per class, so AP divides by 2.
#   epoch 0: precision (2 + 1 + 1) / 9; AP q_zz (1 + 1)/2, q_aa (1/2)/2, q_mm (1/2)/2
#   epoch 1: precision (2 + 1 + 2) / 9; AP q_zz 1, q_aa (1/1)/2, q_mm 1
EXPECTED = {0: {"top1": 1 / 3, "top5": 1.0, "top10": 1.0, "score": 600 / 3 + 300 + 100,
                "precision_at_k": 4 / 9, "map_at_k": (1 + 0.25 + 0.25) / 3, "k": 3, "queries": 3},
            1: {"top1": 1.0, "top5": 1.0, "top10": 1.0, "score": 1000.0,
                "precision_at_k": 5 / 9, "map_at_k": (1 + 0.5 + 1) / 3, "k": 3, "queries": 3}}


def write_image(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 12), colour).save(path)


def write_manifest(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "caption"])
        writer.writerows(rows)


def write_embeddings(epoch: int, query_vectors, query_names=QUERIES) -> None:
    paths.EMBEDDINGS.mkdir(parents=True, exist_ok=True)
    np.savez(paths.embeddings_path(epoch),
             query=np.array(query_vectors, dtype=np.float32),
             gallery=np.array([v for _, _, v in GALLERY], dtype=np.float32),
             query_names=np.array(query_names), gallery_names=np.array([n for n, _, _ in GALLERY]))


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder (the cwd) with images, manifests and two epochs of embeddings."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data" / "root"
    for name in QUERIES:
        write_image(root / "test" / "query" / name, (0, 0, 200))
    for name, _, _ in GALLERY:
        write_image(root / "test" / "gallery" / name, (200, 200, 0))
    write_manifests(labelled=True)
    write_embeddings(0, EPOCH0)
    write_embeddings(1, EPOCH1)
    return root


def write_manifests(labelled: bool) -> None:
    """query.csv and gallery.csv as prepare writes them; labels empty when not `labelled`."""
    def label(name: str) -> str:
        return name if labelled else ""
    write_manifest(paths.PREPARED / "query.csv",
                   [(f"test/query/{n}", label(c), "") for n, c in zip(QUERIES, QUERY_LABELS)])
    write_manifest(paths.PREPARED / "gallery.csv",
                   [(f"test/gallery/{n}", label(c), "") for n, c, _ in GALLERY])


def run(params_factory, root, **overrides):
    """retrieve_all with top_k 3, three picture rows and the given retrieve params."""
    retrieve = {"top_k": 3, "picture_queries": 3, **overrides}
    params = params_factory({f"retrieve.{key}": value for key, value in retrieve.items()})
    return retrieve_all(params.retrieve, root)


def test_results_hold_every_query_in_manifest_order_with_k_gallery_names(project, params_factory):
    report = run(params_factory, project)
    assert report.results == [paths.results_path(0), paths.results_path(1)]
    for epoch, expected in RANKINGS.items():
        text = paths.results_path(epoch).read_text(encoding="utf-8")
        assert list(json.loads(text)) == QUERIES
        assert json.loads(text) == expected


def test_metrics_files_match_hand_computed_values(project, params_factory):
    report = run(params_factory, project)
    summary = json.loads(paths.RETRIEVAL_METRICS.read_text())
    assert set(summary["epochs"]) == {"0", "1"}
    for epoch, expected in EXPECTED.items():
        assert summary["epochs"][str(epoch)] == pytest.approx(expected)
    assert summary["best_on_test"] == pytest.approx({"epoch": 1, **EXPECTED[1]})
    with open(paths.RETRIEVAL_PLOT, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "score", "top1", "top5", "top10", "precision_at_k",
                             "map_at_k"]
    for row, (epoch, expected) in zip(rows, EXPECTED.items()):
        assert int(row["epoch"]) == epoch
        assert {c: float(v) for c, v in row.items() if c != "epoch"} == pytest.approx(
            {c: expected[c] for c in row if c != "epoch"})
    assert report.best_epoch == 1 and "highest test score at epoch 1: 1000.0/1000" in report.summary()


def test_epochs_sort_by_number_and_euclidean_follows_the_param(project, params_factory):
    # Gallery "mid" scaled x3 keeps its direction (cosine as before) but moves far away.
    write_embeddings(10, EPOCH0)
    data = dict(np.load(paths.embeddings_path(10)))
    data["gallery"][2] *= 3
    np.savez(paths.embeddings_path(10), **data)
    run(params_factory, project, metric="euclidean")
    summary = json.loads(paths.RETRIEVAL_METRICS.read_text())
    assert list(summary["epochs"]) == ["0", "1", "10"]
    # q_aa [.6, .8, 0] squared distances: zeta .8, alpha .4, mid 1.8^2 + 1 = 4.24, beta 2.
    assert json.loads(paths.results_path(10).read_text())["q_aa.png"] == \
        ["alpha.png", "zeta.png", "beta.png"]


def test_unknown_labels_give_results_but_no_metrics(project, params_factory):
    write_manifests(labelled=False)
    report = run(params_factory, project)
    assert json.loads(paths.results_path(0).read_text()) == RANKINGS[0]
    assert json.loads(paths.RETRIEVAL_METRICS.read_text()) == {"epochs": {}, "labels": "unknown"}
    assert paths.RETRIEVAL_PLOT.read_text().splitlines() == [
        "epoch,score,top1,top5,top10,precision_at_k,map_at_k"]
    assert report.best_epoch is None and "labels unknown" in report.summary()
    # No right/wrong frames: the first match's frame is background.
    picture = Image.open(paths.picture_path(0)).convert("RGB")
    assert picture.getpixel(match_frame(0, 0)) == pictures.BACKGROUND


def match_frame(row: int, column: int) -> tuple[int, int]:
    """A pixel on the frame of a match tile in the picture."""
    x = 2 * pictures.GAP + pictures.THUMB + column * pictures.THUMB + 1
    return x, pictures.CAPTION + pictures.GAP + row * pictures.THUMB + 1


def test_picture_frames_right_green_and_wrong_red(project, params_factory):
    (project / "test" / "gallery" / "mid.png").write_text("not an image")  # a grey tile
    run(params_factory, project)
    for epoch in (0, 1):
        picture = Image.open(paths.picture_path(epoch))
        assert picture.format == "PNG"
        thumb, gap = pictures.THUMB, pictures.GAP
        assert picture.size == (2 * gap + thumb + gap + 3 * thumb,
                                pictures.CAPTION + gap + 3 * thumb + gap)
    picture = Image.open(paths.picture_path(0)).convert("RGB")
    # Epoch 0, hits per row: q_zz A: A A B; q_aa B: A B A; q_mm A: B A B.
    colour = {True: pictures.RIGHT, False: pictures.WRONG}
    for row, hits in enumerate([[1, 1, 0], [0, 1, 0], [0, 1, 0]]):
        for column, hit in enumerate(hits):
            assert picture.getpixel(match_frame(row, column)) == colour[bool(hit)]
    query_x = pictures.GAP + pictures.THUMB // 2
    assert picture.getpixel((query_x, match_frame(0, 0)[1])) == pictures.QUERY_FRAME
    # q_zz's second match is the unreadable mid.png: grey inside its green frame.
    x, y = match_frame(0, 1)
    half = pictures.THUMB // 2
    assert picture.getpixel((x + half, y + half)) == pictures.UNREADABLE
    assert picture.getpixel((match_frame(0, 0)[0] + half, y + half)) == (200, 200, 0)  # zeta


def test_picture_queries_are_evenly_spaced_and_zero_means_none(project, params_factory):
    assert pictures.picture_rows(100, 3) == [0, 50, 99]
    assert pictures.picture_rows(2, 6) == [0, 1]
    run(params_factory, project, picture_queries=0)
    assert not list(paths.PICTURES.glob("*.png"))


def test_old_outputs_of_a_direct_run_are_removed(project, params_factory):
    paths.PICTURES.mkdir(parents=True)
    stale = [paths.results_path(7), paths.picture_path(7)]
    for path in stale:
        path.write_text("from an earlier run")
    run(params_factory, project)
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in paths.PICTURES.iterdir()) == ["epoch_0.png", "epoch_1.png"]


def test_stale_embeddings_are_refused_before_any_output_changes(project, params_factory):
    run(params_factory, project)
    before = {p: p.read_bytes() for p in Path("repository").rglob("*") if p.is_file()
              and "embeddings" not in p.parts}
    assert len(before) == 6  # two results, two pictures, two metrics files
    write_embeddings(1, EPOCH1, query_names=["q_zz.png", "q_mm.png", "q_aa.png"])
    with pytest.raises(ClipcoreError, match=r"epoch_1\.npz: query names differ from .*query\.csv "
                                            r"\(stale embeddings"):
        run(params_factory, project)
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize("content, message", [
    (b"not an npz", "not a readable embeddings file"),
    (None, "no gallery_names array"),
    ("truncated", r"not a readable embeddings file \(File is not a zip file\)"),  # was BadZipFile
    (b"", "not a readable embeddings file"),  # was EOFError
])
def test_broken_embeddings_name_the_file(project, params_factory, content, message):
    target = paths.embeddings_path(1)
    if content == "truncated":  # a copy or a disk that stopped half-way
        target.write_bytes(target.read_bytes()[:len(target.read_bytes()) // 2])
    elif content is None:
        np.savez(target, query=np.zeros((3, 3)), gallery=np.zeros((4, 3)),
                 query_names=np.array(QUERIES))
    else:
        target.write_bytes(content)
    with pytest.raises(ClipcoreError, match=rf"epoch_1\.npz: .*{message}"):
        run(params_factory, project)


def test_a_stray_copy_beside_the_epoch_files_is_no_epoch(project, params_factory):
    """Before: `epoch_1 (copy).npz` or `model_epoch_1 (copy).pt` stopped the stage with
    ValueError: no epoch number in the file name."""
    shutil.copy(paths.embeddings_path(1), paths.EMBEDDINGS / "epoch_1 (copy).npz")
    model = build_model(params_factory({"model.name": "tiny", "model.pretrained": "none"}).model)
    for epoch in range(2):
        save_model(model, paths.model_path(epoch), backbone_trained=False, epoch=epoch)
    shutil.copy(paths.model_path(1), paths.ALL_WEIGHTS / "model_epoch_1 (copy).pt")
    report = run(params_factory, project)
    assert report.results == [paths.results_path(0), paths.results_path(1)]


def test_embeddings_missing_for_some_model_files_are_refused(project, params_factory):
    """After an interrupted embed, before: results for the epochs it finished, without a word,
    and submit then recorded those alone as the run."""
    model = build_model(params_factory({"model.name": "tiny", "model.pretrained": "none"}).model)
    for epoch in range(4):
        save_model(model, paths.model_path(epoch), backbone_trained=False, epoch=epoch)
    with pytest.raises(ClipcoreError, match=r"^repository/embeddings: no embeddings for epochs "
                                            r"2, 3 of the 4 model files in repository/all_weights "
                                            r"\(an interrupted embed\?\); run `dvc repro embed`$"):
        run(params_factory, project)
    assert not paths.RESULTS.exists()
    for epoch in (2, 3):
        write_embeddings(epoch, EPOCH1)
    assert len(run(params_factory, project).results) == 4


def test_top_k_beyond_the_gallery_names_the_param(project, params_factory):
    with pytest.raises(ClipcoreError, match=r"retrieve\.top_k=5 .*\(4 images\)"):
        run(params_factory, project, top_k=5)


def test_top_k_below_ten_scores_what_the_list_holds(project, params_factory):
    report = run(params_factory, project, top_k=1)
    # Epoch 0 at k = 1: only q_zz hits, and top-5/top-10 can't see beyond the one name.
    assert report.metrics[0]["top1"] == report.metrics[0]["top10"] == pytest.approx(1 / 3)
    assert report.metrics[0]["score"] == pytest.approx(1000 / 3)


def test_real_prepared_manifests(prepared_demo, tmp_path, monkeypatch, params_factory):
    """Manifests written by the prepare stage (digits demo) and random embeddings."""
    root, prepared = prepared_demo
    monkeypatch.chdir(tmp_path)
    frames = {s: read_manifest(prepared, s) for s in ("query", "gallery")}
    names = {s: np.array([Path(p).name for p in f["path"]]) for s, f in frames.items()}
    rng = np.random.default_rng(0)
    paths.EMBEDDINGS.mkdir(parents=True)
    np.savez(paths.embeddings_path(0), query_names=names["query"],
             gallery_names=names["gallery"],
             **{s: rng.standard_normal((len(names[s]), 16)).astype(np.float32) for s in names})
    params = params_factory()
    report = retrieve_all(params.retrieve, root, prepared)
    results = json.loads(paths.results_path(0).read_text())
    assert list(results) == names["query"].tolist()
    assert all(len(r) == params.retrieve.top_k and set(r) <= set(names["gallery"])
               for r in results.values())
    assert report.metrics[0]["queries"] == len(names["query"])  # the demo's labels are known
    assert Image.open(paths.picture_path(0)).height == (
        pictures.CAPTION + 2 * pictures.GAP + params.retrieve.picture_queries * pictures.THUMB)


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_index_on_the_demo_overlaps_exact_search(index, project, params_factory):
    # Four gallery vectors: IVF has one list and HNSW walks every node: exact answers.
    run(params_factory, project, index=index)
    for epoch, expected in RANKINGS.items():
        assert json.loads(paths.results_path(epoch).read_text()) == expected


def test_ivf_and_hnsw_top10_on_the_demo_overlap_exact_by_95_percent(
        prepared_demo, tmp_path, monkeypatch, params_factory):
    """Real demo embeddings (tiny model, epoch 0) ranked with the default index knobs."""
    root, prepared = prepared_demo
    monkeypatch.chdir(tmp_path)
    params = params_factory({"model.name": "tiny", "model.pretrained": "none",
                             "train.epochs": 0, "train.num_workers": 0, "embed.num_workers": 0})
    train(params, root, prepared)
    embed_all(params, root, prepared)
    results = {}
    for index in ("exact", "ivf", "hnsw"):
        retrieve = params_factory({"retrieve.index": index}).retrieve
        retrieve_all(retrieve, root, prepared)
        results[index] = json.loads(paths.results_path(0).read_text())
    exact = results.pop("exact")
    for index, ranking in results.items():
        shared = [len(set(ranking[q]) & set(names)) / len(names) for q, names in exact.items()]
        assert list(ranking) == list(exact) and np.mean(shared) >= 0.95, index


def test_unknown_index_names_the_param(params_factory):
    with pytest.raises(ClipcoreError, match=r"'retrieve\.index' must be one of exact, ivf, hnsw"):
        params_factory({"retrieve.index": "annoy"})


def stage(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "stages.retrieve"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_stage_script_runs_and_reports_errors_in_one_line(project, tmp_path):
    write_params(tmp_path, {"data.root": str(project), "retrieve.top_k": 3})
    done = stage(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "highest test score at epoch 1: 1000.0/1000" in done.stdout
    assert json.loads(paths.results_path(1).read_text()) == RANKINGS[1]
    write_params(tmp_path, {"data.root": str(project), "retrieve.top_k": 9})
    done = stage(tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "retrieve.top_k=9" in done.stderr and "Traceback" not in done.stderr
