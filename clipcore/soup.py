"""Average several fine-tuned runs of one base into one model: python -m clipcore.soup --models
A.pt B.pt [...] [--greedy]

A weight soup: the mean of the runs' trained tensors, an ordinary model file
(--out) that embed, index, query and fuse read as any epoch's. --greedy keeps a run only if the
soup's val score does not drop with it (runs tried best first); the val score is every val image
of data/prepared querying the others, as clipcore.fuse chooses its weights; the test never
chooses. The runs come from finished experiments, e.g.
`dvc get . repository/best/model.pt --rev <experiment> -o runs/<experiment>.pt`.

Why (Wortsman et al. 2022): fine-tunes of one pretrained model tend to lie in one basin,
so their average embeds about as well as an ensemble of them at the cost of one model.

`uniform`: every run in the mean. `greedy`: the runs in order of their val score, each kept only
if the soup's val score does not drop with it (the paper's recipe; 81.03% against 80.39% for the
best single CLIP ViT-B/32 fine-tune and 79.97% for the uniform soup). The output is an ordinary
model file (clipcore.model.checkpoint), read by embed, index, query, fuse as any epoch's.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Callable, Sequence

import torch

from clipcore import paths
from clipcore.data.manifests import read_manifest
from clipcore.errors import ClipcoreError
from clipcore.model.checkpoint import inference_state, load_model_file, save_atomic
from clipcore.model.factory import FineTunedCLIP
from clipcore.params import load_params
from clipcore.retrieve.fusion import embed_images, val_score
from clipcore.stage import run_stage

SOUP_FORMAT_KEY = "soup"  # a soup's model file lists its members under this key


def load_members(files: Sequence[Path]) -> list[tuple[FineTunedCLIP, bool]]:
    """Each file's model and whether its tower trained; all must share one base and head."""
    if not files:
        raise ClipcoreError("a soup needs at least one model file")
    members = [load_model_file(file) for file in files]
    first = members[0][0]
    for file, (model, _) in zip(files[1:], members[1:]):
        if model.base != first.base or model.head_kind != first.head_kind or \
                model.embed_dim != first.embed_dim:
            raise ClipcoreError(f"{file}: made on another base or head than {files[0]}; a soup "
                                f"averages runs fine-tuned from one base")
    return members


@torch.no_grad()
def cook(members: Sequence[tuple[FineTunedCLIP, bool]]) -> tuple[FineTunedCLIP, bool]:
    """A new model holding the mean of the members' trained tensors (the head's, and the
    tower's when any member trained it: the others' tower is the base's), and whether the tower
    is part of it. The members stay as they are."""
    tower = any(trained for _, trained in members)
    first = members[0][0]
    names = set(first.head_state()) | (set(first.backbone_state()) if tower else set())
    states = [model.state_dict() for model, _ in members]
    soup = copy.deepcopy(first)
    soup.load_state_dict({name: torch.stack([s[name].float() for s in states]).mean(0)
                          .to(states[0][name].dtype) for name in names}, strict=False)
    return soup.eval(), tower


def greedy(count: int, score: Callable[[list[int]], float]) -> tuple[list[int], float]:
    """The greedy soup's members (indices) and its val score: the runs by their own score, best
    first (ties: the earlier), each added when the soup with it scores at least as well as
    without (`score`: the val score of the soup of those members)."""
    alone = sorted(range(count), key=lambda i: -score([i]))
    kept, best = [alone[0]], score([alone[0]])
    for i in alone[1:]:
        candidate = score([*kept, i])
        if candidate >= best:
            kept, best = [*kept, i], candidate
    return kept, best


def save_soup(model: FineTunedCLIP, tower: bool, members: Sequence[Path], path: Path) -> None:
    save_atomic({**inference_state(model, tower),
                 SOUP_FORMAT_KEY: [str(member) for member in members]}, path)


def arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clipcore.soup", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", type=Path, required=True,
                        help="model files of runs fine-tuned from one base")
    parser.add_argument("--greedy", action="store_true",
                        help="keep a run only if the val score does not drop (default: uniform)")
    parser.add_argument("--out", type=Path, default=paths.REPOSITORY / "soup" / "model.pt",
                        help="the soup's model file")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params.yaml (data.root, data.crop: where the val images are)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = arguments(argv)
    members = load_members(args.models)
    val = read_manifest(paths.PREPARED, "val")
    data = load_params(args.params).data
    images = [paths.image_root(data.crop, data.root) / p for p in val["path"]]
    labels = val["label"].to_numpy()
    scores: dict[tuple[int, ...], float] = {}

    def score(chosen: list[int]) -> float:
        key = tuple(sorted(chosen))
        if key not in scores:
            soup, _ = cook([members[i] for i in key])
            scores[key] = val_score(embed_images(soup, images, desc=f"soup of {len(key)}"),
                                    labels)
        return scores[key]

    chosen = greedy(len(members), score)[0] if args.greedy else list(range(len(members)))
    for i, file in enumerate(args.models):
        print(f"{file}: val score {score([i]):.1f}{'' if i in chosen else ' (left out)'}")
    soup, tower = cook([members[i] for i in chosen])
    save_soup(soup, tower, [args.models[i] for i in chosen], args.out)
    print(f"{'greedy' if args.greedy else 'uniform'} soup of {len(chosen)}: val score "
          f"{score(chosen):.1f}; wrote {args.out}")


if __name__ == "__main__":
    run_stage(main)
