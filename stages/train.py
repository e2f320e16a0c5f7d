"""Fine-tune the model on the prepared manifests: model files, checkpoints and metrics per epoch."""
import math

from clipcore import paths
from clipcore.model import distributed
from clipcore.params import load_params
from clipcore.stage import run_stage
from clipcore.train.training import train


def main() -> None:
    params = load_params()
    if distributed.relaunch(params.train, "stages.train"):
        return  # the processes torchrun started did the work
    images = paths.image_root(params.data.crop, params.data.root)  # data.crop face: the crops
    history = train(params, images, paths.PREPARED)
    first, last = history[0], history[-1]
    mode = "frozen backbone" if params.train.freeze_backbone else "backbone trained"
    if math.isnan(last["score"]):
        measured = ("no val images, so no val metrics" if math.isnan(last["val_queries"]) else
                    f"no val query has a positive ({last['val_unmatched']:.0f} unmatched), "
                    f"so no val metrics")
    else:
        best = max(history, key=lambda row: row["score"])
        k = int(last.get("k", params.train.val_top_k))  # rows of older checkpoints lack it
        beyond = (f", train.val_top_k={params.train.val_top_k} is beyond the val gallery"
                  if k < params.train.val_top_k else "")
        measured = (f"val score {first['score']:.1f} -> {last['score']:.1f}, best epoch "
                    f"{best['epoch']} ({best['score']:.1f}); val precision@{k} "
                    f"{first['precision_at_k']:.3f} -> {last['precision_at_k']:.3f} "
                    f"({last['val_queries']:.0f} val queries{beyond})")
    print(f"trained {last['epoch']} epochs ({mode}): {measured}; "
          f"model files in {paths.ALL_WEIGHTS}")


if __name__ == "__main__":
    run_stage(main)
