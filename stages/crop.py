"""Crop every prepared image to its largest face (data.crop face) into data/cropped/."""
from clipcore import paths
from clipcore.crop.cropping import crop_all
from clipcore.params import load_params
from clipcore.stage import run_stage


def main() -> None:
    params = load_params()
    print(crop_all(params.data, paths.PREPARED, paths.CROPPED).summary())


if __name__ == "__main__":
    run_stage(main)
