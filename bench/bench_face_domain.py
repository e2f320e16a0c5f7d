"""Whole image against face crop, and their fusion, on a small face domain made from the real
faces scikit-image ships, through the real pipeline (bench_accuracy's harness, open set).

The domain: each of lfw_subset's 100 LFW faces (25 x 25 px, grey, no identity labels) is one
identity. Its 5 training images and its query are photo-like: the face upscaled to a random
side (48-112 px), pasted (soft oval edge) at a random place on a random 224 x 224 crop of one of
scikit-image's non-face photos, then a camera's finish (light gradient, colour cast, noise, blur:
clipcore.demo.domain's). Its one gallery image is stylised: posterised, coloured in a flat
two-colour palette, edges drawn dark, pasted at another place and scale on a flat render-like
background (clipcore.demo.domain's). --stylised-train K makes the last K of the 5 training
images stylised too; --gallery photo makes the gallery photo-like (framing alone, no rendering
gap). All 700 images are drawn once (one domain seed) and
cropped once by the crop stage's crop_all (MTCNN; a faceless image is kept whole).

Per seed: the seed draws which identities train (--train-identities, 60) and which are tested
(the other 40: never trained on); data.val_split class holds 20% of the training identities out
for validation. Two data roots hold the same images, whole and face-cropped. The tiny open_clip
model starts from a base that bench_accuracy.pretrain_base trains on the seed's training
identities' crops (val identities left out; --base none: open_clip's random init) and is
fine-tuned (frozen backbone by default) on each root; each arm is its val-picked epoch. The
fusion ranks by a weighted sum of the two arms' cosines (clipcore.retrieve.fusion), its weight
chosen on the val images only. --face-id adds dlib's face-identity descriptor
(clipcore.retrieve.face_identity, requirements-face-id.txt; on the whole images, it finds the face
itself; no training) alone, and fused with the crop arm (weight chosen on val). Prints MTCNN's
(and dlib's) detection rate per split, then per seed the open-set test scores, and the means
with Student-t 95% intervals, paired differences included.

    OMP_NUM_THREADS=1 python bench/bench_face_domain.py [--seeds 5] [--epochs 10]
        [--pretrain-epochs 40] [--base crops|none] [--mode frozen|unfrozen]
        [--stylised-train 0..4] [--gallery stylised|photo] [--face-id] [--step 0.1]
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from skimage import data as skdata

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_accuracy as bench  # noqa: E402
from bench_fusion import open_set, score  # noqa: E402

from clipcore import paths  # noqa: E402
from clipcore.crop.cropping import crop_all  # noqa: E402
from clipcore.data.manifests import prepare, read_manifest  # noqa: E402
from clipcore.demo.digits import clear_demo_folder, hex_name, write_test_labels  # noqa: E402
from clipcore.demo.domain import background, photo_finish  # noqa: E402
from clipcore.ranking.measures import SCORE_WEIGHTS, competition_score  # noqa: E402
from clipcore.retrieve.fusion import choose_weights, embed_images, fused_vectors  # noqa: E402

DOMAIN_SEED = 0          # the images; bench seeds draw the split, the init and the batch order
CANVAS = 224
FACE_SIDES = (48, 112)
TRAIN_IMAGES = 5
BACKGROUNDS = ("coffee", "chelsea", "rocket", "hubble_deep_field", "brick", "grass", "gravel",
               "coins", "immunohistochemistry")  # no human face in any (bench_faces.py checks four)
DATA = {"data.val_split": "class", "data.val_fraction": 0.2}
ARMS = ("whole", "crop")
FACE_ID_ROWS = ("face-id", "crop + face-id")


def lfw_faces() -> list[Image.Image]:
    """lfw_subset's 100 faces (its other 100 images are non-face patches), as RGB."""
    return [Image.fromarray(np.uint8(np.round(a * 255))).convert("RGB")
            for a in skdata.lfw_subset()[:100]]


def background_photos() -> list[Image.Image]:
    photos = [Image.fromarray(getattr(skdata, name)()).convert("RGB") for name in BACKGROUNDS]
    return [p if min(p.size) >= CANVAS else p.resize(
        (round(p.width * CANVAS / min(p.size)) + 1, round(p.height * CANVAS / min(p.size)) + 1))
        for p in photos]


def paste(canvas: Image.Image, face: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The face at a random side and place on the canvas, with a soft oval edge."""
    side = int(rng.integers(FACE_SIDES[0], FACE_SIDES[1] + 1))
    face = face.resize((side, side), Image.Resampling.BICUBIC)
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).ellipse((0, 0, side - 1, side - 1), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(side / 20))
    x, y = (int(v) for v in rng.integers(0, CANVAS - side + 1, 2))
    canvas.paste(face, (x, y), mask)
    return canvas


def photo_like(face: Image.Image, photos: list[Image.Image], rng: np.random.Generator) -> Image.Image:
    """A training image or query: the face on a random crop of a random non-face photo, with a
    camera's finish (the generated domain's)."""
    photo = photos[int(rng.integers(len(photos)))]
    x = int(rng.integers(0, photo.width - CANVAS + 1))
    y = int(rng.integers(0, photo.height - CANVAS + 1))
    canvas = photo.crop((x, y, x + CANVAS, y + CANVAS))
    return photo_finish(paste(canvas, face, rng), rng)


def stylised(face: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A gallery image: the face posterised into a flat two-colour palette with dark edges, on a
    flat render-like background (the generated domain's)."""
    grey = ImageOps.autocontrast(face.convert("L"))
    flat = ImageOps.posterize(grey, int(rng.integers(3, 5)))
    dark, light = (tuple(int(c) for c in rng.integers(lo, hi, 3)) for lo, hi in ((0, 80), (180, 256)))
    drawn = ImageOps.colorize(flat, dark, light)
    big = drawn.resize((100, 100), Image.Resampling.NEAREST)
    edges = big.convert("L").filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 60 else 0)
    big.paste((20, 20, 20), (0, 0), edges)
    canvas = Image.fromarray(background(rng, CANVAS, photo=False))
    return paste(canvas, big, rng)


def write_face_domain(out: Path, faces: list[Image.Image], seed: int, stylised_train: int,
                      stylised_gallery: bool = True) -> None:
    """Every identity in the competition layout: train/<id>/photo_K.png (the last
    `stylised_train` of them render_K.png, stylised), one photo-like query, one gallery image
    (stylised, or photo-like when not `stylised_gallery`), UUID-named, test_labels.csv. One seed,
    the same images."""
    clear_demo_folder(out)
    photos, names, labels, images = background_photos(), random.Random(seed), [], []
    for number, face in enumerate(faces):
        folder = f"{number:04d}"
        for k in range(TRAIN_IMAGES):
            rng = np.random.default_rng([seed, number, k])
            images.append((f"train/{folder}/photo_{k}.png", photo_like(face, photos, rng))
                          if k < TRAIN_IMAGES - stylised_train else
                          (f"train/{folder}/render_{k}.png", stylised(face, rng)))
        for split, k in (("query", TRAIN_IMAGES), ("gallery", TRAIN_IMAGES + 1)):
            rng = np.random.default_rng([seed, number, k])
            name = f"{hex_name(names)}.png"
            images.append((f"test/{split}/{name}", stylised(face, rng)
                           if split == "gallery" and stylised_gallery else
                           photo_like(face, photos, rng)))
            labels.append((split, name, folder))
    write_test_labels(out, labels)
    for relative, image in images:
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        image.save(out / relative)


def subset_root(full: Path, out: Path, train: list[str], test: list[str]) -> Path:
    """A data root holding `full`'s training images of the `train` identities and its test
    images of the `test` ones (the same relative paths: whole and cropped roots match)."""
    clear_demo_folder(out)
    labels = pd.read_csv(full / paths.DEMO_LABELS, dtype=str)
    labels = labels[labels["label"].isin(test)]
    write_test_labels(out, list(labels.itertuples(index=False, name=None)))
    for folder in train:
        shutil.copytree(full / "train" / folder, out / "train" / folder)
    for split, file in zip(labels["split"], labels["file"]):
        (out / "test" / split).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(full / "test" / split / file, out / "test" / split / file)
    return out


def crop_domain(full: Path, cropped: Path) -> None:
    """The crop stage's crop_all over every image of the domain; prints MTCNN's detection rate
    per split and its speed."""
    params = bench.bench_params({**DATA, "data.root": str(full), "data.crop": "face"})
    prepare(full, full / "prepared", params.data, DOMAIN_SEED)
    started = time.perf_counter()
    report = crop_all(params.data, full / "prepared", cropped)
    seconds = time.perf_counter() - started
    faces = {"training": report.faces["train"] + report.faces["val"],
             "query": report.faces["query"], "gallery": report.faces["gallery"]}
    totals = {"training": faces["training"] + report.whole["train"] + report.whole["val"],
              "query": faces["query"] + report.whole["query"],
              "gallery": faces["gallery"] + report.whole["gallery"]}
    print("MTCNN faces found: " + ", ".join(f"{s} {faces[s]}/{totals[s]}" for s in faces)
          + f" (the others kept whole); {sum(totals.values()) / seconds:.1f} images/s", flush=True)
    shutil.copyfile(full / paths.DEMO_LABELS, cropped / paths.DEMO_LABELS)


def describe_domain(full: Path) -> dict[str, np.ndarray]:
    """dlib's face-identity descriptor of every image of the domain (whole images: it finds the
    face itself), by path relative to the root; prints its detection rate per split."""
    from clipcore.retrieve.face_identity import face_descriptors  # the optional extra
    frames = {s: read_manifest(full / "prepared", s) for s in ("train", "val", "query", "gallery")}
    relative = [p for frame in frames.values() for p in frame["path"]]
    started = time.perf_counter()
    described = face_descriptors([full / p for p in relative], desc="face-id")
    seconds = time.perf_counter() - started
    found = dict(zip(relative, described.found))
    counts = {"training": [found[p] for s in ("train", "val") for p in frames[s]["path"]],
              **{s: [found[p] for p in frames[s]["path"]] for s in ("query", "gallery")}}
    print("dlib HOG faces found: " + ", ".join(f"{s} {sum(v)}/{len(v)}" for s, v in counts.items())
          + f" (the others described whole); {len(relative) / seconds:.1f} images/s", flush=True)
    return dict(zip(relative, described.vectors))


def face_id_arm(root: Path, descriptors: dict[str, np.ndarray], crop: dict, step: float) -> dict:
    """The face-id member's open test score alone, and fused with the crop arm (its weight
    chosen on the val images only)."""
    val = read_manifest(root / "prepared", "val")
    images, n_query, query_labels, gallery_labels = open_set(root)
    vectors = np.stack([descriptors[p.relative_to(root).as_posix()] for p in images])
    query, gallery = vectors[:n_query], vectors[n_query:]
    val_vectors = np.stack([descriptors[p] for p in val["path"]])
    chosen, _ = choose_weights([crop["val"], val_vectors], val["label"].to_numpy(), step)
    return {"alone": score(query, gallery, query_labels, gallery_labels), "weights": chosen,
            "fused": score(fused_vectors([crop["query"], query], chosen),
                           fused_vectors([crop["gallery"], gallery], chosen),
                           query_labels, gallery_labels)}


def pretrain_on_crops(crop_root: Path, out: Path, epochs: int, seed: int) -> Path:
    """bench_accuracy's base, trained on the crops of this seed's training identities that
    fine-tune (the val identities left out: they pick the epoch)."""
    base = out / "base"
    shutil.rmtree(base, ignore_errors=True)
    for folder in sorted(set(read_manifest(crop_root / "prepared", "train")["label"])):
        shutil.copytree(crop_root / "train" / folder, base / "train" / folder)
    return bench.pretrain_base(base, out / "base.pt", epochs, seed)


def run_arm(root: Path, work: Path, params) -> dict:
    """Fine-tune on the root; the val-picked epoch's open test score and its embeddings of the
    val images and of the queries and gallery."""
    run = bench.run_pipeline(work, {"open": root}, None, params)
    epoch = bench.picked_epoch(run, bench.own_protocol(params))
    model = work / paths.model_path(epoch)
    val = read_manifest(root / "prepared", "val")
    images, n_query, _, _ = open_set(root)
    vectors = embed_images(model, images, desc=f"{root.name} test")
    return {"epoch": epoch, "epoch0": run.test["open"][0], "test": run.test["open"][epoch],
            "val": embed_images(model, [root / p for p in val["path"]], desc=f"{root.name} val"),
            "val_labels": val["label"].to_numpy(), "query": vectors[:n_query],
            "gallery": vectors[n_query:]}


def chance(gallery: int) -> float:
    """The expected score of a random ranking, one gallery image per query."""
    return competition_score({k: min(k, gallery) / gallery for k in SCORE_WEIGHTS})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--train-identities", type=int, default=60, help="of the 100; the rest test")
    parser.add_argument("--base", choices=("crops", "none"), default="crops",
                        help="crops: pretrain_base on the training identities' crops; none: "
                             "open_clip's random init")
    parser.add_argument("--stylised-train", type=int, default=0, choices=range(TRAIN_IMAGES),
                        help="of each identity's 5 training images, this many stylised (0: photos only)")
    parser.add_argument("--gallery", choices=("stylised", "photo"), default="stylised",
                        help="photo: a photo-like gallery too (framing alone, no rendering gap)")
    parser.add_argument("--mode", choices=tuple(bench.MODES), default="frozen")
    parser.add_argument("--face-id", action="store_true",
                        help="add dlib's face-identity descriptor, alone and fused with the crop "
                             "arm (pip install --no-deps -r requirements-face-id.txt)")
    parser.add_argument("--step", type=float, default=0.1,
                        help="the fusions' weight grid step (chosen on val)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_face_domain"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    faces = lfw_faces()
    write_face_domain(out / "full", faces, DOMAIN_SEED, args.stylised_train,
                      args.gallery == "stylised")
    crop_domain(out / "full", out / "full_cropped")
    descriptors = describe_domain(out / "full") if args.face_id else None
    print(f"domain: {len(faces)} identities, {time.perf_counter() - started:.0f} s", flush=True)
    scores = {name: [] for name in (*ARMS, "fusion", *(FACE_ID_ROWS if args.face_id else ()))}
    for seed in range(args.seeds):
        seed_started = time.perf_counter()
        order = np.random.default_rng(seed).permutation(len(faces))
        train = [f"{n:04d}" for n in sorted(order[:args.train_identities])]
        test = [f"{n:04d}" for n in sorted(order[args.train_identities:])]
        params_data = bench.bench_params(DATA).data
        roots = {}
        for arm, full in zip(ARMS, (out / "full", out / "full_cropped")):
            roots[arm] = subset_root(full, out / f"seed{seed}" / arm, train, test)
            prepare(roots[arm], roots[arm] / "prepared", params_data, seed)
        weights = (pretrain_on_crops(roots["crop"], out / f"seed{seed}", args.pretrain_epochs, seed)
                   if args.base == "crops" else "none")
        params = bench.bench_params({**bench.tiny_overrides(args.epochs), **DATA,
                                     **bench.MODES[args.mode], "model.pretrained": str(weights),
                                     "seed": seed})
        arms = {arm: run_arm(roots[arm], out / f"seed{seed}" / f"run_{arm}", params)
                for arm in ARMS}
        chosen, val = choose_weights([arms[a]["val"] for a in ARMS], arms["whole"]["val_labels"],
                                     args.step)
        _, _, query_labels, gallery_labels = open_set(roots["whole"])
        fusion = score(fused_vectors([arms[a]["query"] for a in ARMS], chosen),
                       fused_vectors([arms[a]["gallery"] for a in ARMS], chosen),
                       query_labels, gallery_labels)
        for arm in ARMS:
            scores[arm].append(arms[arm]["test"])
        scores["fusion"].append(fusion)
        if args.face_id:
            face_id = face_id_arm(roots["whole"], descriptors, arms["crop"], args.step)
            scores["face-id"].append(face_id["alone"])
            scores["crop + face-id"].append(face_id["fused"])
            print(f"seed {seed}: face-id {face_id['alone']:.1f}; crop + face-id weights "
                  f"{face_id['weights'][0]:g}/{face_id['weights'][1]:g}: "
                  f"{face_id['fused']:.1f}", flush=True)
        print(f"seed {seed}: open test (val-picked epoch; epoch 0) whole "
              f"{arms['whole']['test']:.1f} (ep {arms['whole']['epoch']}; {arms['whole']['epoch0']:.1f}), "
              f"crop {arms['crop']['test']:.1f} (ep {arms['crop']['epoch']}; "
              f"{arms['crop']['epoch0']:.1f}), crop - whole "
              f"{arms['crop']['test'] - arms['whole']['test']:+.1f}; fusion weights whole/crop "
              f"{chosen[0]:g}/{chosen[1]:g} (val {val:.1f}): {fusion:.1f}; "
              f"{time.perf_counter() - seed_started:.0f} s", flush=True)
    print(f"\nface domain, open set, {len(test)} test identities, {args.seeds} seeds, "
          f"{args.gallery} gallery, {args.stylised_train} of 5 training images stylised, base {args.base}, {args.mode}, "
          f"{args.epochs} epochs (test score /1000, mean ± 95% CI; chance "
          f"{chance(len(test)):.1f})")
    for name, values in scores.items():
        print(f"  {name:22s} {bench.mean_ci(values)}")
    print(f"  {'crop - whole (paired)':22s} {bench.mean_ci(np.subtract(scores['crop'], scores['whole']))}")
    print(f"  {'fusion - crop (paired)':22s} "
          f"{bench.mean_ci(np.subtract(scores['fusion'], scores['crop']))}")
    if args.face_id:
        for first, second in (("face-id", "crop"), ("crop + face-id", "crop"),
                              ("crop + face-id", "face-id")):
            print(f"  {f'{first} - {second} (paired)':22s} "
                  f"{bench.mean_ci(np.subtract(scores[first], scores[second]))}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
