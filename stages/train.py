"""Fine-tune the model on the prepared manifests: model files, checkpoints and metrics per epoch."""
import math
from pathlib import Path

from clipcore import distributed, paths
from clipcore.params import load_params
from clipcore.stage import run_stage
from clipcore.training import train


def main() -> None:
    params = load_params()
    if distributed.relaunch(params.train.processes, "stages.train"):
        return  # the processes torchrun started did the work
    history = train(params, Path(params.data.root), paths.PREPARED)
    first, last = history[0], history[-1]
    mode = "frozen backbone" if params.train.freeze_backbone else "backbone trained"
    if math.isnan(last["precision_at_k"]):
        measured = "no val images, so no val metrics"
    else:
        measured = (f"val precision@{params.train.val_top_k} {first['precision_at_k']:.3f} -> "
                    f"{last['precision_at_k']:.3f}, val score {first['score']:.1f} -> "
                    f"{last['score']:.1f}")
    print(f"trained {last['epoch']} epochs ({mode}): {measured}; "
          f"model files in {paths.ALL_WEIGHTS}")


if __name__ == "__main__":
    run_stage(main)
