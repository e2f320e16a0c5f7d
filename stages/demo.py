"""Write the digits demo data root (competition layout) that the pipeline runs on by default."""
from clipcore import paths
from clipcore.demo.digits import write_demo
from clipcore.params import load_params
from clipcore.stage import run_stage


def main() -> None:
    params = load_params()
    write_demo(paths.DEMO_ROOT, params.demo, params.seed)
    print(f"wrote the digits demo to {paths.DEMO_ROOT}")


if __name__ == "__main__":
    run_stage(main)
