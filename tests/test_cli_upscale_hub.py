"""`sr3 upscale --model <Hub repo id>` checks the memory, the mode and the tile options from the repo's configs before
any weights load, as it does for a folder: from huggingface_hub's cache offline (a cache built here), from the
loopback Hub of tests/hub_server.py online (no network leaves the machine)."""

import json
import shutil

import pytest
from test_cli_upscale import _arguments, write_image
from test_hub import hub  # noqa: F401  (the loopback Hub fixture)
from test_hub_loading import publish

from diffusers_sr3 import SR3BasePipeline
from diffusers_sr3.cli import main
from diffusers_sr3.commands import upscale

CONFIGS = ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def hub_cache(tmp_path, monkeypatch):
    """huggingface_hub's default cache, which `sr3 upscale --model` uses: an empty one per test."""
    from huggingface_hub import constants

    cache = tmp_path / "hub_cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def saved(tiny_pipeline, tmp_path):
    folder = tmp_path / "saved"
    tiny_pipeline.save_pretrained(folder)
    return folder


def cache_configs(cache, repo_id, folder, commit=COMMIT, files=CONFIGS):
    """Put `files` of the saved pipeline `folder` into the cache as huggingface_hub lays out `repo_id`'s snapshot
    `commit` on main (its configs only, as after an interrupted download: no weights)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    for name in files:
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / name, target)


def refuse_loading(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("weights loaded before the checks")

    monkeypatch.setattr(upscale, "load_pipeline", load)


def fit_exactly(monkeypatch, output_pixels):
    """The memory available: exactly what the full-size images of `output_pixels` output pixels need (float32, no
    windows)."""
    available = upscale.MIN_BYTES_PER_OUTPUT_PIXEL * output_pixels
    monkeypatch.setattr(upscale, "available_memory", lambda device: (available, "available"))


def test_a_cached_hub_repo_is_checked_before_any_weights_load(saved, hub_cache, tmp_path, monkeypatch, capsys):
    cache_configs(hub_cache, "someone/sr3-tiny", saved)
    refuse_loading(monkeypatch)
    fit_exactly(monkeypatch, 32 * 32 - 1)
    source = write_image(tmp_path / "a.png", (8, 8))
    # The recorded upscale factor (4) makes the 8x8 input's output too big for the memory.
    assert main(_arguments([source], tmp_path / "out", "someone/sr3-tiny")) == 2
    error = capsys.readouterr().err
    assert f"{source}: a 32x32 output needs at least" in error and len(error.strip().splitlines()) == 1
    # The scheduler config tells --mode auto's mode (detail: the tiny model predicts noise), the UNet's the tiles.
    assert main(_arguments([source], tmp_path / "out", "someone/sr3-tiny", "--self-ensemble")) == 2
    assert "use it with --mode fidelity" in capsys.readouterr().err
    assert main(_arguments([source], tmp_path / "out", "someone/sr3-tiny", "--tile-size", "30")) == 2
    assert "is not a multiple of the model's downsampling factor 4" in capsys.readouterr().err


def test_a_hub_repo_that_is_not_cached_offline_is_left_to_the_load(saved, hub_cache, tmp_path, monkeypatch, capsys):
    fit_exactly(monkeypatch, 0)
    source = write_image(tmp_path / "a.png", (8, 8))
    for model in ("someone/not-cached", "no//repo-id"):
        with pytest.raises(OSError) as loading:
            SR3BasePipeline.from_pretrained(model)
        assert main(_arguments([source], tmp_path / "out", model)) == 2
        error = capsys.readouterr().err
        assert str(loading.value) in error and "Traceback" not in error and len(error.strip().splitlines()) == 1
    # A repo cached without its model_index.json tells no upscale factor: checked once loaded, by the load's words.
    cache_configs(hub_cache, "someone/partly-cached", saved, files=CONFIGS[1:])
    assert main(_arguments([source], tmp_path / "out", "someone/partly-cached")) == 2
    assert "memory" not in capsys.readouterr().err


def test_a_model_folder_is_read_without_the_hub(saved, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("a folder's configs read through the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    refuse_loading(monkeypatch)
    fit_exactly(monkeypatch, 32 * 32 - 1)
    source = write_image(tmp_path / "a.png", (8, 8))
    assert main(_arguments([source], tmp_path / "out", saved)) == 2
    assert "a 32x32 output needs at least" in capsys.readouterr().err


def test_online_the_hubs_current_configs_are_read_each_once(saved, hub, hub_cache, tmp_path, monkeypatch):  # noqa: F811
    # The cache holds an older commit, whose factor (64) would refuse the image: the Hub's current one (4) fits.
    stale = tmp_path / "stale"
    shutil.copytree(saved, stale)
    index = json.loads((stale / "model_index.json").read_text(encoding="utf-8"))
    (stale / "model_index.json").write_text(json.dumps({**index, "upscale_factor": 64}), encoding="utf-8")
    cache_configs(hub_cache, "someone/sr3-tiny", stale)
    publish(hub, "someone/sr3-tiny", saved)
    refuse_loading(monkeypatch)
    fit_exactly(monkeypatch, 32 * 32)
    source = write_image(tmp_path / "a.png", (8, 8))
    with pytest.raises(AssertionError, match="weights loaded before the checks"):
        upscale.run(upscale_arguments(source, tmp_path / "out", "someone/sr3-tiny"))
    asked = [request.split("/resolve/", 1)[1].split("/", 1)[1] for request in hub.requests]
    assert sorted(set(asked)) == sorted(CONFIGS) and all(asked.count(name) <= 2 for name in CONFIGS)  # HEAD, GET
    # A factor too large for the memory is refused the same way online.
    fit_exactly(monkeypatch, 32 * 32 - 1)
    with pytest.raises(upscale.NotEnoughMemoryError, match="a 32x32 output"):
        upscale.run(upscale_arguments(source, tmp_path / "out", "someone/sr3-tiny"))


def upscale_arguments(source, output, model):
    from diffusers_sr3.cli import build_parser

    return build_parser().parse_args(_arguments([source], output, model))
