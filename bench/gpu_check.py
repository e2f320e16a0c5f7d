"""The one check to run on a GPU machine: does clipcore work there, does bf16 agree with fp32,
and what limits its speed. Meant to take at most 6 minutes on one H100 (not yet measured: no
GPU has run it); each check prints PASS, FAIL, INFO (a rate, no verdict) or SKIP with its
numbers, the next check runs whatever happened, and the exit status is 1 when any failed.

    python bench/gpu_check.py --out $OUT/gpu_check   # on the GPU machine (docs/gpu.md)
    python bench/gpu_check.py --quick                # here, on the CPU: the reduced form

Runs go through the stages' own code (`python -m stages.train`, `stages.embed`) in a temporary
folder (deleted at the end; the logs and summary.json stay in --out), on the digits demo with
dropout 0 and no augmentation; with CUDA the model is ViT-B-32 itself from random init (there
are no weights there), on the CPU the tiny model:

1-2. train frozen and unfrozen, 2 epochs: bf16 autocast against fp32 (autocast and TF32 off,
     bench/gpu/fp32_stage.py) on the same GPU: every epoch's train and val loss within 2% and
     val score within 25 points (of 1000).
3-4. embed, every model file of those runs: bf16 against fp32 embeddings, cosine per image
     >= 0.99 frozen, >= 0.98 unfrozen (two trainings drift apart).
5.   two processes against one (frozen train and embed): NCCL on 2+ GPUs, gloo without CUDA;
     skipped on one GPU (NCCL needs a GPU per process) and with --quick.
6.   resume: the unfrozen run stopped after epoch 1 and resumed, its optimizer state loaded back
     onto the device, ends as the run that never stopped (losses 1e-3, CPU 1e-4).
7-9. speed on realistic JPEGs made here (250x250 and 1024x768; bench/gpu/speed.py): GPU only
     (ready tensors, warmed up, batch 64 to 512), loader only (8 against all workers, open_clip's
     PIL transform handing over float32 against the model's uint8 pipeline), and the pipeline's own (unfrozen train with the default augmentation,
     embed's feature pass), with its share of the GPU-only rate at batch 64 (goal >= 0.7).

Without CUDA the bf16 checks compare fp32_stage.py with the plain stage (the plumbing only:
they must agree exactly).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpu import checks, speed  # noqa: E402 - bench/gpu, beside this script
from gpu.runs import Machine, write_data  # noqa: E402

from clipcore.model.features import device_note  # noqa: E402
from clipcore.stage import first_line  # noqa: E402

CHECKS = [
    ("train frozen, bf16 against fp32", checks.check_train(frozen=True)),
    ("train unfrozen, bf16 against fp32", checks.check_train(frozen=False)),
    ("embed frozen, bf16 against fp32", checks.check_embed(frozen=True)),
    ("embed unfrozen, bf16 against fp32", checks.check_embed(frozen=False)),
    ("two processes against one", checks.check_processes),
    ("resume unfrozen", checks.check_resume),
    ("speed: GPU only", speed.check_gpu_only),
    ("speed: loader only", speed.check_loader),
    ("speed: pipeline", speed.check_pipeline),
]


def nvidia_smi_sees_a_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:  # a GPU whose driver hangs: CUDA required, said at once
        return True
    return listed.returncode == 0 and "GPU" in listed.stdout


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", type=Path,
                        help="keep every check's log (logs/) and summary.json here "
                             "(default: a new gpu_check_* folder in the temporary directory)")
    parser.add_argument("--require-cuda", action=argparse.BooleanOptionalAction, default=None,
                        help="exit 1 at once, with one line, when torch has no usable CUDA "
                             "(default: on when nvidia-smi lists a GPU)")
    parser.add_argument("--quick", action="store_true",
                        help="the reduced form: tiny model, three digits, fewer photos and "
                             "steps, no 2-process run (about a minute on 2 CPU cores; the tests run it)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"  # never wait for a model hub
    cuda = torch.cuda.is_available()
    required = nvidia_smi_sees_a_gpu() if args.require_cuda is None else args.require_cuda
    if required and not cuda:
        print(f"gpu_check: CUDA required but not usable: {device_note('auto', torch.device('cpu'))}"
              f" (--no-require-cuda runs on the CPU)", file=sys.stderr)
        sys.exit(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if cuda else 0
    summary = {"device": device_note("auto", torch.device("cuda" if cuda else "cpu")),
               "gpus": gpus, "torch": torch.__version__, "quick": args.quick, "checks": []}
    print(f"{summary['device']}, {gpus} GPUs, torch {torch.__version__}; logs in {out}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_work_") as tmp:
        machine = Machine(Path(tmp) / "data", Path(tmp), out / "logs",
                          "cuda" if cuda else "cpu", gpus, args.quick)
        with _logged(out / "logs" / "demo.log"):
            write_data(machine.data, args.quick)
        for number, (name, check) in enumerate(CHECKS, start=1):
            summary["checks"].append(run_check(machine, number, name, check))
            (out / "summary.json").write_text(json.dumps(summary, indent=2))  # each check kept
    failed = sum(c["verdict"] == "FAIL" for c in summary["checks"])
    summary["failed"] = failed
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"{failed} of {len(CHECKS)} checks failed" if failed else "no check failed")
    sys.exit(1 if failed else 0)


def run_check(machine: Machine, number: int, name: str, check) -> dict:
    started = time.perf_counter()
    log = machine.logs / f"{number}_{name.split(',')[0].replace(' ', '_').replace(':', '')}.log"
    try:
        with _logged(log):
            passed, numbers, values = check(machine)
        verdict = {True: "PASS", False: "FAIL", None: "INFO"}[passed]
        if passed is None and "skipped" in values:
            verdict = "SKIP"
    except Exception as exc:  # noqa: BLE001 - a failed check must not stop the others
        verdict, numbers, values = "FAIL", first_line(exc), {}
    seconds = time.perf_counter() - started
    print(f"{verdict} {name} ({seconds:.0f} s): {numbers}", flush=True)
    return {"name": name, "verdict": verdict, "seconds": round(seconds, 1),
            "numbers": numbers, "values": values}


@contextlib.contextmanager
def _logged(log: Path):
    """The in-process work's progress bars and notes into `log`: only verdicts on the console."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    finally:
        log.write_text(buffer.getvalue())


if __name__ == "__main__":
    main()
