"""FineTunedCLIP on the tiny open_clip config: identity head, transforms, trainable parts, and how
`model.pretrained` resolves (local files, cached hub weights, an unreachable hub)."""
from __future__ import annotations

import math
import socket
import time

import huggingface_hub
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from PIL import Image
from safetensors.torch import save_file

from clipcore.data.images import load_rgb
from clipcore.errors import ClipcoreError
from clipcore.files import file_sha256
from clipcore.model.checkpoint import load_file, load_model, save_atomic, save_model
from clipcore.model.factory import MAX_LOGIT_SCALE, build_model
from clipcore.params import ModelParams

TINY = ModelParams(name="tiny", pretrained="none", embed_dim=512, dropout=0.1)
OFFLINE_LIMIT_S = 5.0


def tiny(**changes) -> ModelParams:
    return ModelParams(**{**TINY.__dict__, **changes})


@pytest.fixture(scope="module")
def model():
    return build_model(TINY)


@pytest.fixture(scope="module")
def images(tmp_path_factory, model):
    """A batch made from real PNG files (gradients and stripes, so no two are alike)."""
    folder = tmp_path_factory.mktemp("images")
    batch = []
    for i in range(4):
        pixels = bytes((x * (i + 1) + 40 * y * (i % 2)) % 256 for y in range(48) for x in range(48))
        path = folder / f"img_{i}.png"
        Image.frombytes("L", (48, 48), pixels).convert("RGB").save(path)
        batch.append(model.preprocess_val(load_rgb(path)))
    return torch.stack(batch)


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_tiny_builds_fast():
    start = time.perf_counter()
    built = build_model(TINY)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in built.parameters())
    print(f"tiny: built in {seconds:.3f} s, {params / 1e6:.1f}M parameters")
    assert seconds < 2.0
    assert built.pixels.size == (32, 32)


def test_none_is_the_same_random_base_every_time(model):
    """So a model file made on `pretrained: none` reloads onto the same backbone."""
    torch.manual_seed(1)
    expected_next = torch.rand(3)
    torch.manual_seed(1)
    again = build_model(TINY)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def pending_cuda_seed() -> int | None:
    """The seed torch gives the CUDA generators when CUDA starts: seeding before then is queued
    (torch.cuda._lazy_seed_tracker, private; the only view of it without a GPU)."""
    queued = [call for call in torch.cuda._lazy_seed_tracker.get_calls() if call]
    if not queued:
        return None
    callback = queued[-1][0]
    cells = dict(zip(callback.__code__.co_freevars, callback.__closure__))
    return cells["seed"].cell_contents


def test_building_a_model_leaves_the_cuda_generators_to_the_run_seed():
    """Before, build_model's private seeding (torch.manual_seed(0) inside fork_rng(devices=[]))
    reseeded every CUDA generator with 0 and left it so: on a GPU, dropout started from seed 0
    whatever `seed` said."""
    torch.manual_seed(1234)  # as the trainer seeds before building its model
    cuda_before = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    build_model(TINY)
    if cuda_before is None:
        assert pending_cuda_seed() == 1234
    else:
        after = torch.cuda.get_rng_state_all()
        assert all(torch.equal(a, b) for a, b in zip(cuda_before, after))


def test_a_model_file_of_the_older_format_names_its_version(tmp_path, model):
    """Before, a file from before the head standardised its input (no head.mean/head.std) failed
    with "tensors do not match a tiny model": nothing said it came from another version."""
    path = tmp_path / "model_epoch_1.pt"
    save_model(model, path, backbone_trained=False, epoch=1)
    old = load_file(path)
    old["format"] = "clipcore-model/1"
    old["model"].pop("head", None)
    old["state"] = {k: v for k, v in old["state"].items() if k not in ("head.mean", "head.std")}
    save_atomic(old, path)
    with pytest.raises(ClipcoreError) as error:
        load_model(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert "another clipcore version (format 'clipcore-model/1', this one reads " \
           "'clipcore-model/2'" in message
    assert "dvc repro train" in message


def test_identity_head_gives_zero_shot_clip_embeddings(model, images):
    model.eval()
    with torch.no_grad():
        normalised = model.normalise(images)  # the uint8 pixels as the model takes them
        expected = F.normalize(model.clip.encode_image(normalised), dim=-1)
        assert torch.equal(model(images), expected)
        assert torch.equal(model.backbone_features(images), model.clip.encode_image(normalised))
        assert torch.equal(model.backbone_features(normalised), model.backbone_features(images))


def test_untrained_head_stays_the_identity_once_standardising(images):
    built = build_model(TINY).eval()
    with torch.no_grad():
        features = built.backbone_features(images)
        built.head.set_feature_stats(features)
        assert torch.equal(built.embed_features(features), F.normalize(features, dim=-1))
        assert torch.allclose(((features - built.head.mean) / built.head.std).std(0, correction=0),
                              torch.ones(features.shape[1]), atol=1e-3)


def test_wider_head_pads_with_zeros(model, images):
    wide = build_model(tiny(embed_dim=640)).eval()
    assert not wide.head.linear.weight.any() and not wide.head.linear.bias.any()
    with torch.no_grad():
        embedded = wide(images)
        expected = F.normalize(model.eval().clip.encode_image(model.normalise(images)), dim=-1)
    assert embedded.shape == (4, 640)
    assert torch.equal(embedded[:, :512], expected) and not embedded[:, 512:].any()


def test_narrower_head_is_refused():
    with pytest.raises(ClipcoreError, match=r"model\.embed_dim: 256 .* 512"):
        build_model(tiny(embed_dim=256))


def test_caption_embeddings_share_the_image_space(model):
    captions = ["a photo of class number 3", "a photo of a cat", "a photo of class number 3"]
    wide = build_model(tiny(embed_dim=600))
    text = wide.caption_embeddings(captions)
    tokens = open_clip.get_tokenizer("tiny")(captions)
    with torch.no_grad():
        expected = F.normalize(wide.clip.encode_text(tokens), dim=-1)
    assert text.shape == (3, 600) and not text.requires_grad
    assert torch.allclose(text[:, :512], expected) and not text[:, 512:].any()
    assert torch.allclose(text.norm(dim=1), torch.ones(3))
    assert torch.equal(text[0], text[2]) and not torch.equal(text[0], text[1])


def test_frozen_backbone_stays_in_eval_mode_while_the_head_trains():
    built = build_model(TINY).train()
    trainable = {name for name, p in built.named_parameters() if p.requires_grad}
    assert trainable == {"head.linear.weight", "head.linear.bias", "clip.logit_scale"}
    assert built.head.training and not built.clip.visual.training and not built.clip.training

    built.set_backbone_trainable(True)
    trainable = {name for name, p in built.named_parameters() if p.requires_grad}
    visual = {f"clip.visual.{name}" for name, _ in built.clip.visual.named_parameters()}
    assert trainable == visual | {"head.linear.weight", "head.linear.bias", "clip.logit_scale"}
    assert built.clip.visual.training and not built.clip.transformer.training
    assert not built.clip.token_embedding.weight.requires_grad

    built.eval()
    assert not built.clip.visual.training and not built.head.training
    assert set(built.backbone_state()) == visual


def test_train_transform_flips_and_crops_only_when_augmenting(model):
    half_white = Image.new("RGB", (64, 64))
    half_white.paste((255, 255, 255), (0, 0, 32, 64))
    assert model.train_transform(False) is model.preprocess_val
    torch.manual_seed(0)
    augmented = [model.train_transform(True)(half_white) for _ in range(20)]
    left_brighter = [bool(x[:, :, :16].float().mean() > x[:, :, 16:].float().mean())
                     for x in augmented]
    assert 0 < sum(left_brighter) < 20, "every view has the same orientation: no flip"
    assert len({tuple(x.flatten()[:200].tolist()) for x in augmented}) > 2, "no random crop"
    plain = model.train_transform(False)
    assert torch.equal(plain(half_white), plain(half_white))


def test_logit_scale_clamp(model):
    scale = model.clip.logit_scale
    with torch.no_grad():
        scale.fill_(10.0)
    model.clamp_logit_scale()
    assert scale.item() == pytest.approx(MAX_LOGIT_SCALE) == pytest.approx(math.log(100))
    with torch.no_grad():
        scale.fill_(-1.0)
    model.clamp_logit_scale()
    assert scale.item() == 0.0 and scale.requires_grad


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_weights_file_round_trips(tmp_path, suffix):
    source = build_model(TINY)
    with torch.no_grad():  # weights unlike the seeded random init
        for p in source.clip.parameters():
            p.add_(0.01)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.clip.state_dict().items()}
    torch.save(state, path) if suffix == ".pt" else save_file(state, path)

    loaded = build_model(tiny(pretrained=str(path)))
    for name, tensor in source.clip.state_dict().items():
        assert torch.equal(loaded.clip.state_dict()[name], tensor), name
    assert loaded.base == {"name": "tiny", "pretrained": str(path), "sha256": file_sha256(path)}


def test_bad_local_weights_are_refused(tmp_path):
    class Code:
        def __reduce__(self):
            return (print, ("unpickled",))

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"visual.proj": Code()}, unsafe)
    with pytest.raises(ClipcoreError, match=r"model\.pretrained: .*unsafe\.pt.* weights_only"):
        build_model(tiny(pretrained=str(unsafe)))
    foreign = tmp_path / "foreign.pt"
    torch.save({"some.other.layer": torch.zeros(3)}, foreign)
    with pytest.raises(ClipcoreError, match=r"model\.pretrained: cannot load .*foreign\.pt.* tiny"):
        build_model(tiny(pretrained=str(foreign)))


@pytest.mark.parametrize("changes, message", [
    ({"name": "ViT-B-33"}, r"model\.name: unknown open_clip model 'ViT-B-33' \(try ViT-B-32"),
    ({"name": "ViT-B-32", "pretrained": "opanai"},
     r"model\.pretrained: 'opanai' is neither a weights file nor a known tag .*openai"),
    ({"pretrained": "weights/missing.pt"}, r"model\.pretrained: weights file weights/missing\.pt not found"),
])
def test_unknown_names_are_refused(changes, message):
    with pytest.raises(ClipcoreError, match=message):
        build_model(tiny(**changes))


def _cached(repo_id: str, filename: str) -> bool:
    return isinstance(huggingface_hub.try_to_load_from_cache(repo_id, filename), str)


@pytest.fixture
def silent_server():
    """A URL where connections open but no byte ever comes back (a hung hub or proxy)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # never accepted: the kernel completes the handshake, nothing answers
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.mark.parametrize("environment", ["as is", "refused", "silent", "HF_HUB_OFFLINE"])
def test_uncached_tag_without_hub_fails_fast(monkeypatch, request, environment):
    """ViT-B-32/openai with no hub: one clear line within seconds, not the hub's 46 s of retries."""
    if _cached("timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors"):
        pytest.skip("the openai ViT-B-32 weights are cached on this machine")
    if environment == "as is":
        try:
            socket.create_connection(("huggingface.co", 443), timeout=3).close()
            pytest.skip("the hub is reachable from here")
        except OSError:
            pass
    elif environment == "refused":
        monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    elif environment == "silent":
        monkeypatch.setenv("HF_ENDPOINT", request.getfixturevalue("silent_server"))
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    start = time.perf_counter()
    with pytest.raises(ClipcoreError) as error:
        build_model(ModelParams("ViT-B-32", "openai", 512, 0.1))
    seconds = time.perf_counter() - start
    message = str(error.value)
    print(f"[{environment}] failed in {seconds:.2f} s: {message}")
    assert seconds < OFFLINE_LIMIT_S
    assert message.startswith("model.pretrained: the 'openai' weights for ViT-B-32")
    assert "\n" not in message
    for way_out in ("connect once", "local weights file", "to none"):
        assert way_out in message


def test_cached_tag_loads_without_the_hub(tmp_path, monkeypatch):
    """A tag whose weights sit in the Hugging Face cache builds offline, with the tag's QuickGELU."""
    repo_id, revision = "clipcore/tiny-test", "0" * 40
    snapshot = tmp_path / "models--clipcore--tiny-test" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(revision)
    quick = open_clip.create_model("tiny", force_quick_gelu=True)
    save_file(quick.state_dict(), snapshot / "open_clip_model.safetensors")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny", {
        "cached": {"hf_hub": f"{repo_id}/", "quick_gelu": True, "mean": (0.5,) * 3, "std": (0.25,) * 3}})
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())  # any hub access would fail

    built = build_model(tiny(pretrained="cached"))
    assert isinstance(built.clip.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    for name, tensor in quick.state_dict().items():
        assert torch.equal(built.clip.state_dict()[name], tensor), name
    # The tag's mean and std normalise the model's input: white (255) is (1 - 0.5) / 0.25.
    extremes = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    assert built.normalise(extremes).flatten().tolist() == [-2.0, 2.0] * 3
    assert built.base == {"name": "tiny", "pretrained": "cached", "sha256": None}
