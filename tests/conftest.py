"""Shared fixtures: the tests' params (tests/params.yaml, never the workspace params.yaml that
`dvc exp run -S` rewrites) with overrides, and the digits demo written and prepared once per
test session."""
from __future__ import annotations

import contextlib
import signal
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from clipcore.data.manifests import prepare
from clipcore.demo.digits import write_demo
from clipcore.model.factory import FineTunedCLIP
from clipcore.params import Params, parse_params, with_overrides

REPO = Path(__file__).parents[1]
TEST_PARAMS = Path(__file__).with_name("params.yaml")  # params.yaml's defaults, same keys


def default_params_dict() -> dict:
    return yaml.safe_load(TEST_PARAMS.read_text())


def write_params(folder: Path, overrides: dict | None = None) -> Path:
    """folder/params.yaml holding the tests' params with dotted-key overrides (for stage runs)."""
    path = Path(folder) / "params.yaml"
    path.write_text(yaml.safe_dump(with_overrides(default_params_dict(), overrides),
                                   sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def no_proxy_for_loopback(monkeypatch):
    """A proxy configured in the environment must not intercept the tests' loopback servers."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture(autouse=True)
def own_submission_history(monkeypatch, tmp_path_factory):
    """Each test's submit runs (the stage's subprocesses too) keep their history in a folder of
    their own, never the user's ~/.local/share one, which a rerun of the suite would then see."""
    data_home = tmp_path_factory.mktemp("data_home")
    monkeypatch.delenv("CLIPCORE_SUBMIT_HISTORY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(data_home))


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt in this test, as at a terminal, even when pytest was
    started where SIGINT is ignored (a background job of a non-interactive shell inherits
    SIG_IGN, and Python then installs no handler)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def params_factory():
    """make(overrides) -> Params: the tests' params with dotted-key overrides."""
    raw = default_params_dict()

    def make(overrides: dict | None = None) -> Params:
        return parse_params(with_overrides(raw, overrides))
    return make


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory, params_factory) -> Path:
    params = params_factory()
    root = tmp_path_factory.mktemp("demo") / "data"
    write_demo(root, params.demo, params.seed)
    return root


@pytest.fixture(scope="session")
def prepared_demo(demo_root, tmp_path_factory, params_factory) -> tuple[Path, Path]:
    params = params_factory({"data.val_split": "image"})
    prepared = tmp_path_factory.mktemp("prepared")
    prepare(demo_root, prepared, params.data, params.seed)
    return demo_root, prepared


def flip_bit(path: Path, entry: str = "data/0", at: int = 100) -> None:
    """Flip one bit inside a stored entry of a torch zip archive, as a failing disk or a bad
    copy does: the archive still opens and torch.load would read a changed tensor."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(entry))
    data = bytearray(path.read_bytes())
    header = info.header_offset
    name_length = int.from_bytes(data[header + 26:header + 28], "little")
    extra_length = int.from_bytes(data[header + 28:header + 30], "little")
    data[header + 30 + name_length + extra_length + at] ^= 1
    path.write_bytes(bytes(data))


@contextlib.contextmanager
def images_through_the_tower():
    """How many images each pass of the image tower took, in order."""
    seen = []
    original = FineTunedCLIP.backbone_features

    def counting(self, images):
        seen.append(len(images))
        return original(self, images)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FineTunedCLIP, "backbone_features", counting)
        yield seen


FACES = ("astronaut", "camera")      # scikit-image's photos with a face (requirements-face.txt)
FACELESS = ("coffee", "chelsea")     # and without: a cup, a cat


def photo(name: str) -> Image.Image:
    from skimage import data  # an optional install: only the crop tests call this
    return Image.fromarray(getattr(data, name)()).convert("RGB")


def write_face_root(root: Path) -> Path:
    """A competition-layout root of real photos: each a class with two training images (one
    turned 5 degrees), a query and a gallery image (turned the other way)."""
    for name in FACES + FACELESS:
        image = photo(name)
        for folder, picture in ((f"train/{name}", image), (f"train/{name}", image.rotate(5)),
                                ("test/query", image), ("test/gallery", image.rotate(-5))):
            target = Path(root) / folder
            target.mkdir(parents=True, exist_ok=True)
            picture.save(target / f"{name}_{folder.split('/')[1][0]}{len(list(target.iterdir()))}.png")
    return Path(root)


def photo_like(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A camera-like RGB picture of `size` (width, height): smooth colour fields, texture and
    sensor-like noise, so resizing and JPEG decoding behave as on a photo (a flat image would
    hide their differences)."""
    rng = np.random.default_rng(seed)
    width, height = size

    def field(cells: tuple[int, int], amplitude: float) -> np.ndarray:
        grid = Image.fromarray((rng.random((*cells, 3)) * 255).astype(np.uint8))
        return np.asarray(grid.resize(size, Image.BICUBIC), dtype=np.float32) * amplitude

    ramp = np.linspace(0, 60, width, dtype=np.float32)[None, :, None]
    pixels = (field((5, 7), 0.7) + field((max(1, height // 12), max(1, width // 12)), 0.25)
              + ramp + rng.normal(0, 5, (height, width, 3)))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
