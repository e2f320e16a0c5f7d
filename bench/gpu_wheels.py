"""Download, here, the wheels the GPU machine lacks for train, embed, retrieve and gpu_check.

The GPU machine (Python 3.12, torch 2.11, numpy 2.5, no network) has no open_clip_torch, ftfy,
wcwidth, faiss-cpu or pytorch-metric-learning; dvc and dvclive are not needed there (the
training stages import neither: tests/pipeline/test_outside_dvc.py). The wheels go into
`gpu_wheels/` (git-ignored), which the device tool carries with the working tree (64 MiB in
all); there, one command installs them and runs the check (docs/gpu.md):

    pip install --no-index --no-deps --target /tmp/site gpu_wheels/*.whl && \\
      PYTHONPATH=/tmp/site python bench/gpu_check.py --out $OUT/gpu_check

    python bench/gpu_wheels.py [--out gpu_wheels] [--python-version 3.12]
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FROM_REQUIREMENTS = ("open_clip_torch", "faiss-cpu", "pytorch-metric-learning")
# open_clip_torch's own dependencies that the GPU machine lacks (the versions pip resolves
# beside the pins here); its others (regex, huggingface_hub, timm, safetensors) are there.
ALSO = {"ftfy": "6.3.1", "wcwidth": "0.7.0"}
BUDGET_MIB = 40  # of the 64 MiB a device call carries: the rest is the working tree


def pinned(requirements: Path) -> dict[str, str]:
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", requirements.read_text(), re.M))
    missing = [name for name in FROM_REQUIREMENTS if name not in pins]
    if missing:
        sys.exit(f"{requirements}: no == pin for {', '.join(missing)}")
    return {name: pins[name] for name in FROM_REQUIREMENTS} | ALSO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "gpu_wheels")
    parser.add_argument("--python-version", default="3.12")
    args = parser.parse_args()
    wanted = pinned(REPO / "requirements.txt")
    if args.out.exists():
        shutil.rmtree(args.out)  # only this run's wheels travel
    args.out.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", "--implementation", "cp",
                    "--python-version", args.python_version,
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", str(args.out),
                    *(f"{name}=={version}" for name, version in wanted.items())], check=True)
    wheels = sorted(args.out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels) / 2**20
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:6.1f} MiB  {wheel.name}")
    print(f"{total:6.1f} MiB in {len(wheels)} wheels in {args.out} (budget {BUDGET_MIB} MiB)")
    if len(wheels) != len(wanted):
        sys.exit(f"expected {len(wanted)} wheels, got {len(wheels)}")
    if total > BUDGET_MIB:
        sys.exit(f"over the {BUDGET_MIB} MiB budget")


if __name__ == "__main__":
    main()
