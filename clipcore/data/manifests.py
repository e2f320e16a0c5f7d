"""The prepare stage: check a competition-layout data root and write the split manifests.

A data root holds `train/<class>/<image>`, `test/query/<image>`, `test/gallery/<image>` and,
optionally, `test_labels.csv` (split,file,label) with the true classes of the test images.
Every image is decoded once here, so later stages never meet a broken file halfway through
an epoch. A training image that does not decode is listed in skipped.csv and left out; a query
or gallery image that does not decode stops prepare, naming it: the server ranks every query
against every gallery image, so leaving one out would fail every submission later.

Each manifest row holds the sha256 of its file's bytes, read again right after the check: a
resumed run compares them, so images changed under the same names are caught, not only renamed or
relabelled ones. It costs little next to decoding: 4.6 s against 255 s for 21,000 JPEGs of
100 KB (bench/bench_digest.py). A size+mtime stat would save 3.4 s of that, but it changes with
every fresh copy or checkout and misses a replacement that keeps both (rsync -a, cp -p).
"""
from __future__ import annotations

import hashlib
import os
import sys
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from clipcore import paths
from clipcore.data.images import IMAGE_SUFFIXES, UnreadableImage, load_rgb
from clipcore.errors import ClipcoreError
from clipcore.files import file_sha256, write_text_atomic
from clipcore.params import DataParams

COLUMNS = ["path", "label", "caption", "sha256"]
TEST_SPLITS = ("query", "gallery")
JUNK_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}  # archive and OS leftovers, not data


@dataclass(frozen=True)
class PrepareReport:
    counts: dict[str, int]             # rows per manifest: train, val, query, gallery
    classes: dict[str, int]            # distinct classes in train and in val
    skipped: list[tuple[str, str]]     # (path relative to the root, reason)
    labelled: bool                     # test_labels.csv gave the test images their classes

    def summary(self) -> str:
        counts = ", ".join(f"{split} {n}" for split, n in self.counts.items())
        return (f"prepared {counts} images; classes: train {self.classes['train']}, "
                f"val {self.classes['val']}; test labels {'known' if self.labelled else 'unknown'}"
                f"; skipped {len(self.skipped)}")


def prepare(root: Path, out: Path, data: DataParams, seed: int) -> PrepareReport:
    """Write out/{train,val,query,gallery}.csv and out/skipped.csv for the data root."""
    root, out = Path(root), Path(out)
    folders = {"train": root / "train", "query": root / "test" / "query",
               "gallery": root / "test" / "gallery"}
    for folder in (root, *folders.values()):
        if not folder.is_dir():
            raise ClipcoreError(f"{folder}: folder not found (expected the competition layout "
                                f"train/<class>/, test/query/, test/gallery/ under data.root)")
    candidates = {split: folder_files(folder) for split, folder in folders.items()}
    _warn_of_linked_folders(root)
    readable, skipped, digests = _check_images(candidates, folders["train"], root)
    labels = _test_labels(root, candidates, readable)
    _check_test_images(skipped, root, labels)

    train = _train_frame(readable["train"], folders["train"], root, data, digests)
    _check_test_names(readable, root)
    is_val = _val_mask(train["label"], data, seed)
    frames = {"train": train[~is_val], "val": train[is_val]}
    for split in TEST_SPLITS:
        frames[split] = pd.DataFrame(
            {"path": [_relative(f, root) for f in readable[split]],
             "label": [labels.get((split, nfc(f.name)), "") for f in readable[split]],
             "caption": "", "sha256": [digests[f] for f in readable[split]]}, columns=COLUMNS)

    for split, frame in frames.items():
        write_text_atomic(out / f"{split}.csv",
                          frame.sort_values("path").to_csv(index=False, lineterminator="\n"))
    write_text_atomic(out / "skipped.csv", pd.DataFrame(skipped, columns=["path", "reason"])
                      .to_csv(index=False, lineterminator="\n"))
    if skipped:
        print(f"warning: skipped {len(skipped)} files that are not usable images, listed in "
              f"{out / 'skipped.csv'}", file=sys.stderr)
    return PrepareReport(counts={split: len(frame) for split, frame in frames.items()},
                         classes={split: frames[split]["label"].nunique()
                                  for split in ("train", "val")},
                         skipped=skipped, labelled=bool(labels))


def read_manifest(folder: Path, split: str) -> pd.DataFrame:
    """One manifest as strings throughout (class "007" stays "007", an empty label stays "")."""
    path = Path(folder) / f"{split}.csv"
    if not path.is_file():
        raise ClipcoreError(f"{path}: manifest not found (run `dvc repro prepare`)")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def manifest_digests(prepared: Path, splits: Sequence[str]) -> dict[str, str]:
    """What the manifests of `splits` hold, as two sha256 digests: "split" of their rows (which
    files, with which labels and captions, in which manifest) and "content" of their files'
    bytes (the sha256 column: changed pixels under the same names)."""
    rows, content = hashlib.sha256(), hashlib.sha256()
    for split in splits:
        frame = read_manifest(prepared, split)
        rows.update(frame.reindex(columns=COLUMNS[:3]).to_csv(index=False).encode("utf-8"))
        content.update(f"{split}\n".encode("utf-8"))
        content.update("\n".join(frame.get("sha256", [])).encode("utf-8"))
    return {"split": rows.hexdigest(), "content": content.hexdigest()}


def labels_by_name(frame: pd.DataFrame) -> dict[str, str] | None:
    """Base file name -> label of a query or gallery manifest; None when any label is unknown."""
    if (frame["label"] == "").any():
        return None
    return {PurePosixPath(path).name: label for path, label in zip(frame["path"], frame["label"])}


def read_labels_table(path: Path) -> pd.DataFrame:
    """A test_labels.csv as strings, checked for its split,file,label columns."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ClipcoreError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    if list(table.columns) != ["split", "file", "label"]:
        raise ClipcoreError(f"{path}: columns must be split,file,label, "
                            f"got {','.join(map(str, table.columns))}")
    return table


def caption(class_name: str, data: DataParams) -> str:
    """The text a class is trained against; numbered classes get their own template."""
    template = data.numeric_caption_template if class_name.isdigit() else data.caption_template
    return template.replace("{name}", class_name.replace("_", " "))


def _is_junk(path: Path, top: Path) -> bool:
    return any(part.startswith(".") or part in JUNK_NAMES
               for part in path.relative_to(top).parts)


def folder_files(folder: Path) -> list[Path]:
    """Every non-junk file below a folder, sorted; a name that is not UTF-8 stops here. Linked
    folders are followed (a class folder linked in; Path.rglob skips them), each real folder
    once, so a link to a folder above ends there."""
    found, seen = [], set()
    for top, folders, names in os.walk(folder, followlinks=True):
        if os.path.realpath(top) in seen:
            folders.clear()
            continue
        seen.add(os.path.realpath(top))
        found += [Path(top, name) for name in names]
    files = sorted(p for p in found if p.is_file() and not _is_junk(p, folder))
    for path in files:
        _check_utf8(path)
    return files


def _warn_of_linked_folders(root: Path) -> None:
    """prepare reads linked folders, but DVC hashes a dependency folder without entering them
    (dvc 3.67): a change to their images would rerun no stage."""
    linked = sorted(p for p in root.rglob("*") if p.is_symlink() and p.is_dir())
    if linked:
        more = f" (and {len(linked) - 1} more)" if len(linked) > 1 else ""
        print(f"warning: {linked[0]} is a link to a folder{more}: prepare reads it, but DVC "
              f"does not look inside linked folders, so a change there reruns no stage; copy "
              f"it in for DVC to track it", file=sys.stderr)


def _check_utf8(path: Path) -> None:
    """The file system hands Python a byte that is not UTF-8 as a lone surrogate, which fails
    only when the manifests are written: name the file now, showing the byte."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise ClipcoreError(f"{shown}: file or folder name is not UTF-8; rename it (the "
                            f"manifests and results hold names as UTF-8)") from None


def nfc(name: str) -> str:
    """A file name in Unicode's composed form: macOS file systems and some archives store "é" as
    e + a combining accent (NFD), a CSV typed elsewhere as one character (NFC)."""
    return unicodedata.normalize("NFC", name)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _problem(path: Path) -> str | None:
    """Why a file cannot be used as an image, or None when it decodes."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file suffix ({path.suffix or 'none'})"
    try:
        load_rgb(path)
    except UnreadableImage as exc:
        return str(exc).removeprefix(f"{path}: ")
    return None


def _inspect(path: Path) -> tuple[str | None, str]:
    """Why a file is no usable image (None: it is one), and the sha256 of its bytes if it is
    (read again right after decoding, from the page cache)."""
    problem = _problem(path)
    return problem, "" if problem else file_sha256(path)


def _check_images(candidates: dict[str, list[Path]], train: Path, root: Path):
    """The files of each split that decode, (relative path, reason) for the others, and the
    sha256 of each readable file.

    Threads overlap file reads and PIL's decoders, which release the GIL.
    """
    loose = {f for f in candidates["train"] if f.parent == train}
    skipped = [(_relative(f, root), "not inside a class folder") for f in sorted(loose)]
    files = [f for split_files in candidates.values() for f in split_files if f not in loose]
    with ThreadPoolExecutor() as pool:
        # The bar is drained first: zip stopping at the last file would leave it one short.
        inspected = list(tqdm(pool.map(_inspect, files), total=len(files),
                              desc="checking images", unit="img"))
    problems = {f: problem for f, (problem, _) in zip(files, inspected)}
    digests = {f: digest for f, (_, digest) in zip(files, inspected)}
    skipped += [(_relative(f, root), reason) for f, reason in problems.items() if reason]
    readable = {split: [f for f in split_files if f in problems and not problems[f]]
                for split, split_files in candidates.items()}
    return readable, skipped, digests


def _check_test_images(skipped: list[tuple[str, str]], root: Path,
                       labels: dict[tuple[str, str], str]) -> None:
    """A query or gallery file with an image suffix or a label must decode (other files, an
    unlabelled notes.txt, are no test images and stay skipped)."""
    def test_image(path: PurePosixPath) -> bool:
        return path.parts[0] == "test" and (path.suffix.lower() in IMAGE_SUFFIXES
                                            or (path.parts[1], nfc(path.name)) in labels)
    broken = [(path, reason) for path, reason in skipped if test_image(PurePosixPath(path))]
    if broken:
        (path, reason), more = broken[0], len(broken) - 1
        split = PurePosixPath(path).parts[1]
        raise ClipcoreError(
            f"{root / path}: cannot read a {split} image ({reason})"
            + (f" and {more} more" if more else "")
            + "; the server ranks every query against every gallery image: replace "
            + ("them with readable copies" if more else "it with a readable copy"))


def _train_frame(files: list[Path], train: Path, root: Path, data: DataParams,
                 digests: dict[Path, str]) -> pd.DataFrame:
    """Rows of labelled training images; a class folder without a readable image is an error."""
    classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not _is_junk(p, train))
    if not classes:
        raise ClipcoreError(f"{train}: no class folders (expected train/<class>/<image>)")
    labels = [f.relative_to(train).parts[0] for f in files]
    present = set(labels)
    for name in classes:
        if name not in present:
            raise ClipcoreError(f"{train / name}: class folder holds no readable image")
    rows = [(_relative(f, root), label, caption(label, data), digests[f])
            for f, label in zip(files, labels)]
    return pd.DataFrame(rows, columns=COLUMNS)


def _check_test_names(readable: dict[str, list[Path]], root: Path) -> None:
    """Results name test images by base file name, so two files may not share one."""
    seen: dict[str, Path] = {}
    for split in TEST_SPLITS:
        if not readable[split]:
            raise ClipcoreError(f"{root / 'test' / split}: no readable images")
        for path in readable[split]:
            if nfc(path.name) in seen:  # names that look the same are the same name to a user
                raise ClipcoreError(f"{_relative(path, root)}: same file name as "
                                    f"{_relative(seen[nfc(path.name)], root)}; test file names "
                                    f"must be unique across query and gallery")
            seen[nfc(path.name)] = path


def _test_labels(root: Path, candidates: dict[str, list[Path]],
                 readable: dict[str, list[Path]]) -> dict[tuple[str, str], str]:
    """(split, base name) -> class from test_labels.csv; {} when the root has none. Every
    readable test image needs a label; a skipped file (unreadable) may have one or not."""
    path = root / paths.DEMO_LABELS
    if not path.is_file():
        return {}
    table = read_labels_table(path)
    keys = list(zip(table["split"], map(nfc, table["file"])))
    known = {(split, nfc(f.name)) for split in TEST_SPLITS for f in candidates[split]}
    usable = {(split, nfc(f.name)) for split in TEST_SPLITS for f in readable[split]}
    problems = [("names unknown test file", sorted(set(keys) - known)),
                ("lacks labels for", sorted(usable - set(keys))),
                ("has an empty label for", sorted(k for k, label in zip(keys, table["label"])
                                                  if not label)),
                ("repeats", sorted(k for k, n in Counter(keys).items() if n > 1))]
    for what, found in problems:
        if found:
            split, name = found[0]
            raise ClipcoreError(f"{path}: {what} {split}/{name}"
                                + (f" and {len(found) - 1} more" if len(found) > 1 else ""))
    return dict(zip(keys, table["label"]))


def _val_mask(labels: pd.Series, data: DataParams, seed: int) -> np.ndarray:
    """Which training rows are held out for validation."""
    if data.val_fraction == 0:
        return np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(seed)
    if data.val_split == "class":
        return labels.isin(_val_classes(sorted(labels.unique()), data.val_fraction, rng)).to_numpy()
    return _stratified_mask(labels.to_numpy(), data.val_fraction, rng)


def _val_classes(classes: list[str], fraction: float, rng: np.random.Generator) -> list[str]:
    """Whole classes held out: at least 2 each side, so val retrieval has rivals to rank."""
    if len(classes) < 4:
        raise ClipcoreError(f"params: 'data.val_split' class needs at least 4 training classes "
                            f"(2 kept, 2 held out), found {len(classes)}; use image or "
                            f"data.val_fraction 0")
    n_val = min(max(2, round(fraction * len(classes))), len(classes) - 2)
    return [classes[i] for i in rng.permutation(len(classes))[:n_val]]


def _stratified_mask(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Hold out about `fraction` of every class, keeping at least one training image each.

    Per-class shares are rounded by largest remainder, so the total stays close to the fraction
    even with many small classes (0.15 of 5 images each: some classes give one, others none),
    where sklearn's stratified split refuses to run.
    """
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = fraction * counts
    share = np.minimum(np.floor(exact), counts - 1).astype(int)
    room = share < counts - 1
    missing = round(fraction * counts[counts > 1].sum()) - share.sum()
    order = rng.permutation(len(classes))  # random tie-break among equal remainders
    order = order[np.argsort(-(exact - share)[order], kind="stable")]
    share[order[room[order]][:max(missing, 0)]] += 1
    mask = np.zeros(len(labels), dtype=bool)
    for k in range(len(classes)):
        rows = np.flatnonzero(inverse == k)
        mask[rng.permutation(rows)[:share[k]]] = True
    return mask
