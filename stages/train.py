"""Fine-tune the model on the prepared manifests: model files, checkpoints and metrics per epoch."""
from pathlib import Path

from clipcore import paths
from clipcore.params import load_params
from clipcore.stage import run_stage
from clipcore.training import train


def main() -> None:
    params = load_params()
    history = train(params, Path(params.data.root), paths.PREPARED)
    first, last = history[0], history[-1]
    mode = "frozen backbone" if params.train.freeze_backbone else "backbone trained"
    print(f"trained {last['epoch']} epochs ({mode}): val precision@{params.retrieve.top_k} "
          f"{first['precision_at_k']:.3f} -> {last['precision_at_k']:.3f}, val score "
          f"{first['score']:.1f} -> {last['score']:.1f}; model files in {paths.ALL_WEIGHTS}")


if __name__ == "__main__":
    run_stage(main)
