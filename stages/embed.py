"""Embed the query and gallery images with every epoch's model file."""
from clipcore import paths
from clipcore.model import distributed
from clipcore.params import load_params
from clipcore.retrieve.embedding import embed_all
from clipcore.stage import run_stage


def main() -> None:
    params = load_params()
    if distributed.relaunch(params.train, "stages.embed"):
        return  # the processes torchrun started did the work
    images = paths.image_root(params.data.crop, params.data.root)  # data.crop face: the crops
    report = embed_all(params, images, paths.PREPARED)
    print(f"embedded {report.images['query']} queries and {report.images['gallery']} gallery "
          f"images with {len(report.files)} model files ({report.backbone_passes} backbone "
          f"passes) into {paths.EMBEDDINGS}")


if __name__ == "__main__":
    run_stage(main)
