"""The Spaces demo (spaces/app.py): its API through gradio_client against a server on 127.0.0.1, on a tiny model."""

import contextlib
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import socket
import sys
import tempfile
import threading
import types

import gradio
import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from conftest import REPO, SAMPLES, needs_bfloat16_kernels, tiny_unet_config
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from packaging.requirements import Requirement
from test_image_io import POSTSCRIPT, fake_ghostscript, png_claiming_size
from test_inputs_image_files import _garbled_exif_jpeg, float_rgb_tiff

from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel, backends, make_scheduler
from diffusers_sr3.image_processing import images_to_tensor, resize_bicubic, tensor_to_pil
from diffusers_sr3.noise import SCHEDULERS
from diffusers_sr3.pipelines.pipeline_sr3 import FIDELITY_STEPS, SELF_ENSEMBLE_SIZE, evaluations_per_crop
from diffusers_sr3.tiling import tiled_super_resolve

PHOTO = SAMPLES / "celebahq_16_128" / "lr_16" / "00031.png"  # a real 16x16 face
MAX_PIXELS = 32 * 32
STEPS = 3


def load_app():
    """Import spaces/app.py (a script, not part of the package) once, as module `sr3_space_app`."""
    if "sr3_space_app" not in sys.modules:
        spec = importlib.util.spec_from_file_location("sr3_space_app", REPO / "spaces" / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["sr3_space_app"] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules["sr3_space_app"]


def save_tiny_model(folder) -> str:
    """Save a tiny x4 SR3 pipeline (32x32 tiles, 100-step DDPM schedule) to `folder` and return its path."""
    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config()).eval()
    SR3Pipeline(unet, make_scheduler("ddpm", n_timestep=100), upscale_factor=4).save_pretrained(folder)
    return str(folder)


@contextlib.contextmanager
def serving(folder, **build_kwargs):
    """Serve the demo of a fresh tiny model in `folder` on a free port: yields (app, pipeline, demo, url).

    Uploads and results go under `folder` too, not into the machine's shared gradio cache, and so do the folders
    that gradio_client downloads each result through: it makes one in the system temp folder per file and leaves it.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(folder / "gradio"))
        (folder / "tmp").mkdir()
        patch.setattr(tempfile, "tempdir", str(folder / "tmp"))
        # float32 everywhere, so results compare with the pipeline's own to a rounding step on any CPU
        patch.setattr(backends, "fast_bfloat16", lambda device: False)
        app = load_app()
        pipeline = app.load_pipeline(save_tiny_model(folder / "model"), device="cpu")
        demo = app.build_demo(pipeline, **build_kwargs)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        _, url, _ = app.launch(demo, server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            assert url.startswith(f"http://127.0.0.1:{port}")
            yield app, pipeline, demo, url
        finally:
            demo.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("space")
    with serving(folder, max_pixels=MAX_PIXELS, examples=load_app().example_images()) as (app, pipeline, demo, url):
        client = Client(url, verbose=False, download_files=str(folder / "downloads"))
        yield types.SimpleNamespace(app=app, pipeline=pipeline, demo=demo, client=client)


def predict(
    client, path, scale="x4", steps=STEPS, scheduler="ddim", seed=0, frames=0, strength=1.0, self_ensemble=False
):
    return client.predict(
        handle_file(str(path)),
        scale,
        steps,
        scheduler,
        seed,
        frames,
        strength,
        self_ensemble,
        api_name="/super_resolve",
    )


def pixels(path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_api_super_resolves_a_photo(served):
    app, pipeline, client = served.app, served.pipeline, served.client
    gallery, (slider_bicubic, slider_sr3), process, info = predict(client, PHOTO, frames=2)

    low_resolution = PIL.Image.open(PHOTO).convert("RGB")
    assert [item["caption"] for item in gallery] == [
        "input 16x16 (nearest neighbour)",
        "bicubic 64x64",
        "SR3 64x64",
    ]
    nearest, bicubic, sr3 = (pixels(item["image"]) for item in gallery)
    assert nearest.shape == bicubic.shape == sr3.shape == (64, 64, 3)
    np.testing.assert_array_equal(nearest, np.asarray(low_resolution.resize((64, 64), PIL.Image.NEAREST)))
    np.testing.assert_array_equal(pixels(slider_bicubic), bicubic)
    np.testing.assert_array_equal(pixels(slider_sr3), sr3)

    # Bicubic is PIL's filter; SR3 is the pipeline's own tiled result with the same sampler, steps and seed.
    expected_bicubic = np.asarray(low_resolution.resize((64, 64), PIL.Image.BICUBIC), dtype=np.int16)
    assert np.abs(bicubic - expected_bicubic).max() <= 1
    direct = tiled_super_resolve(
        app.with_scheduler(pipeline, "ddim"),
        low_resolution,  # `sr3 upscale`'s tiling: a 64x64 output fits the memory budget, so it runs whole
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert np.abs(sr3 - np.asarray(direct, dtype=np.int16)).max() <= 1
    assert np.abs(sr3 - bicubic).mean() > 1  # an untrained tiny model, but the result is its own, not bicubic

    # The process strip: the upsampled input, then 2 snapshots (the last is the result).
    assert process["visible"] is True
    strip = pixels(process["value"])
    assert strip.shape == (64, 3 * 64, 3)
    assert np.abs(strip[:, 128:] - sr3).max() <= 1
    assert "16x16 → 64x64" in info and "ddim, 3 steps, seed 0" in info and "seed 0 · untiled ·" in info


def test_downloads_stage_in_the_tests_folder_not_the_systems_temp_folder(served):
    predict(served.client, PHOTO)
    staged = pathlib.Path(tempfile.gettempdir())
    assert staged.name == "tmp" and (staged.parent / "model").is_dir()  # the served folder
    assert any(staged.iterdir())  # gradio_client's download folders, left behind


def test_api_x2_is_the_x4_result_downscaled(served):
    client = served.client

    x4 = predict(client, PHOTO, scheduler="euler", seed=7)
    gallery, _, process, info = predict(client, PHOTO, scale="x2 (x4, then downscaled)", scheduler="euler", seed=7)
    assert [pixels(item["image"]).shape for item in gallery] == [(32, 32, 3)] * 3
    downscaled = tensor_to_pil(resize_bicubic(images_to_tensor(PIL.Image.open(x4[0][2]["image"])), (32, 32)))[0]
    assert np.abs(pixels(gallery[2]["image"]) - np.asarray(downscaled, dtype=np.int16)).max() <= 1
    assert process["visible"] is False and process["value"] is None
    assert "16x16 → 32x32" in info and "euler" in info


def test_api_same_seed_same_result_other_seed_other_result(served):
    client = served.client
    first, again, other = (
        predict(client, PHOTO, scheduler="dpmsolver", seed=seed)[0][2]["image"] for seed in (3, 3, 4)
    )
    np.testing.assert_array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).mean() > 1


def test_api_refuses_a_file_that_is_no_image(served, tmp_path):
    client = served.client
    fake = tmp_path / "holiday.png"
    fake.write_text("this is a text file with a .png name\n", encoding="utf-8")
    with pytest.raises(AppError, match=r"holiday\.png is not an image this demo can read"):
        predict(client, fake)


def test_api_refuses_an_image_over_the_pixel_limit(served, tmp_path):
    client = served.client
    large = tmp_path / "large.png"
    PIL.Image.open(PHOTO).resize((40, 30), PIL.Image.BICUBIC).save(large)
    with pytest.raises(
        AppError, match=r"large\.png is 40x30 = 1,200 pixels; this demo accepts images of at most 1,024"
    ):
        predict(client, large)
    # Beyond Pillow's decompression-bomb limit too: too large, not "damaged".
    bomb = tmp_path / "panorama.png"
    bomb.write_bytes(png_claiming_size(20000, 20000))
    refused = r"panorama\.png is over 178,956,970 pixels; this demo accepts images of at most"
    with pytest.raises(AppError, match=refused):
        predict(client, bomb)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(steps=0), "steps must be a whole number from 1 to 100, got 0"),
        (dict(steps=2.5), "steps must be a whole number from 1 to 100, got 2.5"),
        (dict(seed=-1), "seed must be a whole number from 0 to 4294967295"),
        (dict(scheduler="plms"), "scheduler must be one of ddim, dpmsolver, unipc, euler, ddpm, got 'plms'"),
        (dict(scale="x3"), "scale must be one of x4, x2 (x4, then downscaled), got 'x3'"),
        (dict(strength=1.5), "detail strength must be a number in (0, 1], got 1.5"),
        (dict(strength=0), "detail strength must be a number in (0, 1], got 0"),
        (dict(self_ensemble="maybe"), "self-ensemble must be true or false, got 'maybe'"),
    ],
)
def test_api_refuses_bad_settings(served, arguments, message):
    client = served.client
    with pytest.raises(AppError, match=re.escape(message)):
        predict(client, PHOTO, **arguments)


def test_progress_follows_the_refinement_steps(served):
    app, pipeline = served.app, served.pipeline
    reported = []
    image = PIL.Image.open(PHOTO).convert("RGB")
    result = app.super_resolve(pipeline, image, 4, 4, "unipc", seed=0, progress=reported.append)
    assert reported == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert result.sr3.size == (64, 64) and result.process is None and result.sr3.mode == "RGB"
    gray = app.super_resolve(pipeline, image.convert("L").convert("RGB"), 4, 1, "ddim", seed=0)
    assert gray.sr3.mode == "L" and gray.sr3.size == (64, 64)  # black and white stays so, untinted
    assert type(pipeline.scheduler).__name__ == "DDPMScheduler"  # the served pipeline keeps its own sampler
    with pytest.raises(ValueError, match="scale x3 is neither the model's factor x4"):
        app.super_resolve(pipeline, image, 3, 1, "ddim", seed=0)


def test_uploads_are_read_upright_as_rgb(tmp_path):
    app = load_app()
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned 90 degrees; viewers rotate the picture upright
    rotated = tmp_path / "phone.jpg"
    PIL.Image.new("RGB", (20, 10), "red").save(rotated, exif=exif)
    assert app.read_upload(str(rotated), "phone.jpg", 200).size == (10, 20)
    palette = tmp_path / "palette.png"
    PIL.Image.new("P", (8, 6)).save(palette)
    assert app.read_upload(str(palette), "palette.png", 48).mode == "RGB"
    truncated = tmp_path / "truncated.png"
    PIL.Image.open(PHOTO).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(gradio.Error, match="truncated.png is a damaged or unsupported image"):
        app.read_upload(str(truncated), "truncated.png", 1000)


def test_a_postscript_upload_named_png_is_refused_unread(tmp_path, monkeypatch):
    marker = fake_ghostscript(tmp_path, monkeypatch)
    upload = tmp_path / "pic.png"
    upload.write_bytes(POSTSCRIPT)
    with pytest.raises(gradio.Error, match="pic.png is not an image this demo can read"):
        load_app().read_upload(str(upload), "pic.png", 1000)
    assert not marker.exists()


def test_scale_choices_and_samplers():
    assert set(load_app().DEMO_SCHEDULERS) <= set(SCHEDULERS)

    app = load_app()
    assert app.scale_choices(4) == {"x4": 4, "x2 (x4, then downscaled)": 2}
    assert list(app.scale_choices(8).values()) == [8, 4, 2]
    assert app.scale_choices(3) == {"x3": 3}


def test_model_is_the_argument_else_the_environment_else_the_packaged_one(monkeypatch):
    app = load_app()
    monkeypatch.setattr(app, "default_model_path", lambda: "/packaged/model")
    monkeypatch.setenv("SR3_MODEL", "from/environment")
    assert app.resolve_model("from/argument") == "from/argument"
    assert app.resolve_model(None) == "from/environment"
    monkeypatch.delenv("SR3_MODEL")
    assert app.resolve_model(None) == "/packaged/model"


def test_runs_without_analytics_and_offers_readable_examples(served):
    app = served.app
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and served.demo.analytics_enabled is False
    examples = app.example_images()
    assert len(examples) >= 3
    for path in examples:
        image = app.read_upload(path, os.path.basename(path), app.DEFAULT_MAX_PIXELS)
        assert image.mode == "RGB" and min(image.size) >= 32


def test_space_metadata_and_requirements():
    readme = (REPO / "spaces" / "README.md").read_text(encoding="utf-8")
    front_matter = yaml.safe_load(readme.split("---\n")[1])
    assert {"title", "emoji", "colorFrom", "colorTo", "sdk", "sdk_version", "app_file", "pinned", "license"} <= set(
        front_matter
    )
    assert front_matter["sdk"] == "gradio" and (REPO / "spaces" / front_matter["app_file"]).is_file()
    assert re.fullmatch(r"\d+\.\d+\.\d+", str(front_matter["sdk_version"]))
    assert len(front_matter["short_description"]) <= 60  # the Hub's limit

    # The Space carries the package folder, so it needs the package's own dependencies (and gradio from the SDK).
    lines = (REPO / "spaces" / "requirements.txt").read_text(encoding="utf-8").splitlines()
    listed = {Requirement(line).name.lower() for line in lines if line.strip() and not line.startswith("#")}
    needed = {
        Requirement(requirement).name.lower().replace("_", "-")
        for requirement in importlib.metadata.requires("diffusers-sr3")
        if "extra ==" not in requirement
    }
    assert {name.replace("_", "-") for name in listed} == needed


def tiny_clean_image_pipeline() -> SR3Pipeline:
    """A tiny x4 residual pipeline that predicts the clean image, so it has both modes (and the self-ensemble)."""
    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config()).eval()
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample")
    return SR3Pipeline(unet, scheduler, upscale_factor=4, residual=True, residual_scale=5.0)


def test_models_that_predict_the_clean_image_are_shown_in_both_modes(monkeypatch):
    app = load_app()
    monkeypatch.setattr(backends, "fast_bfloat16", lambda device: False)
    pipeline = tiny_clean_image_pipeline()
    image = PIL.Image.open(PHOTO).convert("RGB")
    fidelity = app.super_resolve(pipeline, image, 4, STEPS, "ddim", seed=0, mode="fidelity")
    # The Space's fidelity result is the pipeline's own (with `sr3 upscale`'s tiling).
    direct = tiled_super_resolve(pipeline, image, mode="fidelity").images[0]
    assert np.abs(np.asarray(fidelity.sr3, dtype=np.int16) - np.asarray(direct, dtype=np.int16)).max() <= 1
    detail = app.super_resolve(pipeline, image, 4, STEPS, "ddim", seed=0, mode="detail")
    assert np.abs(np.asarray(fidelity.sr3, dtype=np.int16) - np.asarray(detail.sr3, dtype=np.int16)).max() > 0
    labels = [block.label for block in app.build_demo(pipeline).blocks.values() if getattr(block, "label", None)]
    assert "input | bicubic | SR3 fidelity | SR3 detail" in labels
    # Detail strength below 1 adds detail on top of the fidelity answer: between fidelity and full detail.
    # 4 steps: strength 0.3 of them runs int(1.2) = 1, as Diffusers' image-to-image counts (of 3 it would run none).
    light = app.super_resolve(pipeline, image, 4, 4, "ddim", seed=0, mode="detail", eta=1.0, strength=0.3)
    away = [
        np.abs(np.asarray(fidelity.sr3, dtype=np.int16) - np.asarray(result.sr3, dtype=np.int16)).mean()
        for result in (light, detail)
    ]
    assert 0 < away[0] < away[1]
    page = app.build_demo(pipeline, detail_defaults={"strength": 0.3, "eta": 1.0})
    sliders = [block for block in page.blocks.values() if "detail strength" in (getattr(block, "label", "") or "")]
    assert len(sliders) == 1 and sliders[0].value == 0.3 and sliders[0].visible
    boxes = [block for block in page.blocks.values() if "self-ensemble" in (getattr(block, "label", "") or "")]
    assert len(boxes) == 1 and boxes[0].value is False and boxes[0].visible
    # Without them, the page preselects the model's own detail settings (its pipeline config), as any loader does.
    studied = SR3Pipeline(pipeline.unet, pipeline.scheduler, detail_steps=7, detail_strength=0.4, detail_eta=1.0)
    page = app.build_demo(studied)
    chosen = {getattr(block, "label", None): getattr(block, "value", None) for block in page.blocks.values()}
    strength_label = next(label for label in chosen if label and "detail strength" in label)
    assert chosen["steps"] == 7 and chosen[strength_label] == 0.4
    # An epsilon model has no fidelity mode: the page shows detail mode only.
    epsilon = SR3Pipeline(pipeline.unet, make_scheduler("ddpm", n_timestep=100), upscale_factor=4)
    page = app.build_demo(epsilon)
    labels = [block.label for block in page.blocks.values() if getattr(block, "label", None)]
    assert "input | bicubic | SR3 detail" in labels
    assert not [
        block
        for block in page.blocks.values()
        if any(word in (getattr(block, "label", "") or "") for word in ("detail strength", "self-ensemble"))
        and block.visible
    ]


def test_the_fidelity_self_ensemble_is_the_pipelines_with_progress_over_every_orientation(monkeypatch):
    app = load_app()
    monkeypatch.setattr(backends, "fast_bfloat16", lambda device: False)
    pipeline = tiny_clean_image_pipeline()
    image = PIL.Image.open(PHOTO).convert("RGB").resize((16, 8))  # not square: 4 orientations are turned
    reported = []
    ensemble = app.super_resolve(
        pipeline, image, 4, STEPS, "ddim", seed=0, mode="fidelity", self_ensemble=True, progress=reported.append
    )
    direct = tiled_super_resolve(pipeline, image, mode="fidelity", self_ensemble=True).images[0]
    assert np.array_equal(np.asarray(ensemble.sr3), np.asarray(direct))
    single = app.super_resolve(pipeline, image, 4, STEPS, "ddim", seed=0, mode="fidelity")
    assert np.abs(np.asarray(ensemble.sr3, dtype=np.int16) - np.asarray(single.sr3, dtype=np.int16)).max() > 0
    # One report per evaluation: 8 orientations of FIDELITY_STEPS evaluations each, untiled at this size.
    total = SELF_ENSEMBLE_SIZE * FIDELITY_STEPS
    assert reported == [(done, total) for done in range(1, total + 1)]
    with pytest.raises(ValueError, match="the self-ensemble averages fidelity answers"):
        app.super_resolve(pipeline, image, 4, STEPS, "ddim", seed=0, mode="detail", self_ensemble=True)


@needs_bfloat16_kernels
def test_the_space_runs_like_sr3_upscale(monkeypatch):
    """Untiled while the output fits the memory budget, in the fewest tiles beyond; bf16 where that is fast."""
    app = load_app()
    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config(sample_size=64, pixel_unshuffle_factor=4)).eval()
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample_range=4.0)
    pipeline = SR3Pipeline(unet, scheduler, upscale_factor=4, residual=True, residual_scale=2.0)
    image = PIL.Image.open(PHOTO).convert("RGB").resize((40, 24))
    monkeypatch.setattr(backends, "fast_bfloat16", lambda device: False)
    float32 = app.super_resolve(pipeline, image, 4, STEPS, "ddim", seed=0, mode="fidelity")
    assert (float32.tiles, float32.tile) == (1, (160, 96))  # 160x96 output: one whole-image evaluation
    direct = tiled_super_resolve(pipeline, image, mode="fidelity").images[0]
    assert np.array_equal(np.asarray(float32.sr3), np.asarray(direct))
    monkeypatch.setattr(backends, "fast_bfloat16", lambda device: True)
    mixed = app.super_resolve(pipeline, image, 4, STEPS, "ddim", seed=0, mode="fidelity")
    difference = np.abs(np.asarray(mixed.sr3, dtype=np.int16) - np.asarray(float32.sr3, dtype=np.int16))
    assert 0 < difference.max() <= 8 and difference.mean() < 0.5
    monkeypatch.setattr(backends, "fast_bfloat16", lambda device: False)
    monkeypatch.setattr(app, "MAX_TILE_PIXELS", 256)  # a 16x16 network grid per evaluation: 160x96 needs tiles
    reported = []
    tiled = app.super_resolve(pipeline, image, 4, STEPS, "ddim", seed=0, mode="fidelity", progress=reported.append)
    assert tiled.tiles > 1 and tiled.tile[0] < 160
    # Progress counts every tile of every evaluation, and ends at its total.
    total = FIDELITY_STEPS * tiled.tiles
    assert reported[-1] == (total, total) and len(reported) > FIDELITY_STEPS
    direct = tiled_super_resolve(pipeline, image, mode="fidelity", max_tile_pixels=256).images[0]
    assert np.array_equal(np.asarray(tiled.sr3), np.asarray(direct))


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_progress_counts_detail_modes_windows_and_ends_on_its_total(strength):
    """A model saved with detail windows (as the packaged one) runs them in each refinement evaluation: the Space's
    bar counts them, so it neither stops short nor sits at 100% while they run."""
    from conftest import low_resolution_unet

    app = load_app()
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample=False)
    pipeline = SR3Pipeline(low_resolution_unet(), scheduler, residual=True, detail_steps=3, detail_window_size=32)
    pipeline.set_progress_bar_config(disable=True)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    reported = []
    app.super_resolve(pipeline, image, 4, 3, "ddim", seed=0, strength=strength, progress=reported.append)
    # Untiled, each evaluation is one crop, and each refinement evaluation's windows fill one crop more.
    evaluations = evaluations_per_crop("detail", 3, strength, scheduler, False, FIDELITY_STEPS)
    windowed = evaluations - (FIDELITY_STEPS if strength < 1 else 0)
    total = evaluations + windowed
    assert reported[-1] == (total, total) and type(reported[-1][1]) is int
    assert [done for done, _ in reported] == list(range(1, total + 1))


def test_the_command_line_refuses_a_device_this_machine_lacks(tmp_path, monkeypatch, capsys):
    app = load_app()
    launched = []
    monkeypatch.setattr(app, "launch", launched.append)
    missing_cuda = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--model", save_tiny_model(tmp_path / "model"), "--device", missing_cuda])
    assert exit_info.value.code == 2 and f"--device {missing_cuda}: this machine has" in capsys.readouterr().err
    assert launched == []


def test_a_steps_and_strength_pair_that_runs_no_step_is_named_before_any_mode_runs(monkeypatch):
    app = load_app()
    ran = []
    monkeypatch.setattr(app, "super_resolve", lambda *args, **kwargs: ran.append(kwargs))
    demo = app.build_demo(tiny_clean_image_pipeline())
    run = next(function.fn for function in demo.fns.values() if function.api_name == "super_resolve")
    upload = {"path": str(PHOTO), "orig_name": "photo.png"}
    with pytest.raises(gradio.Error, match=r"strength 0\.6 of 1 steps runs no step .* give at least 2 steps"):
        run(upload, "x4", 1, "ddim", 0, 0, 0.6, False)
    assert ran == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "{missing}"], "no such folder"),
        (["--model", "{unconditional}"], "not a SR3Pipeline"),
    ],
)
def test_the_command_line_names_a_model_it_cannot_serve(tmp_path, monkeypatch, capsys, argv, message):
    app = load_app()
    monkeypatch.setattr(app, "launch", lambda demo: pytest.fail("launched"))
    from diffusers_sr3 import SR3UnconditionalPipeline

    unconditional = tmp_path / "unconditional"
    unet = SR3UNet2DModel(**tiny_unet_config(in_channels=3))
    SR3UnconditionalPipeline(unet, make_scheduler("ddpm", n_timestep=10)).save_pretrained(unconditional)
    folders = {"missing": tmp_path / "missing", "unconditional": unconditional}
    with pytest.raises(SystemExit) as exit_info:
        app.main([part.format(**folders) for part in argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_queue_turns_away_requests_beyond_its_limit(tmp_path, monkeypatch, capsys):
    """A single worker with an unbounded queue let a busy Space pile up requests without end."""
    app = load_app()
    assert app.build_demo(tiny_clean_image_pipeline(), max_queue=3)._queue.max_size == 3
    assert app.build_demo(tiny_clean_image_pipeline())._queue.max_size == app.DEFAULT_MAX_QUEUE
    launched = []
    monkeypatch.setattr(app, "launch", launched.append)
    model = save_tiny_model(tmp_path / "model")
    app.main(["--model", model, "--max-queue", "0"])
    monkeypatch.setenv("SR3_MAX_QUEUE", "7")
    app.main(["--model", model])
    assert [demo._queue.max_size for demo in launched] == [sys.maxsize, 7]
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")  # where gradio reads no limit (None) as 1
    assert app.build_demo(tiny_clean_image_pipeline(), max_queue=None)._queue.max_size == sys.maxsize
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--model", model, "--max-queue", "-1"])
    assert exit_info.value.code == 2 and "--max-queue must be 0 (no limit) or more" in capsys.readouterr().err


def test_the_command_line_names_a_pixel_limit_that_is_no_number(monkeypatch, capsys):
    app = load_app()
    monkeypatch.setenv("SR3_MAX_PIXELS", "1e5")
    with pytest.raises(SystemExit) as exit_info:
        app.main([])
    assert exit_info.value.code == 2 and "--max-pixels: invalid int value: '1e5'" in capsys.readouterr().err


def test_transparent_uploads_keep_their_transparency_in_every_picture(tmp_path, monkeypatch):
    """The Space read the RGB only: transparent areas showed the black stored under them, with SR3 speckle on top.
    Every picture it returns keeps the alpha, resized as `sr3 upscale` resizes it (nearest for the input shown)."""
    app = load_app()
    monkeypatch.setattr(backends, "fast_bfloat16", lambda device: False)
    demo = app.build_demo(tiny_clean_image_pipeline())
    run = next(function.fn for function in demo.fns.values() if function.api_name == "super_resolve")
    alpha = np.full((16, 16), 255, np.uint8)
    alpha[:, 8:] = 0  # the right half transparent, black under it
    rgba = np.asarray(PIL.Image.open(PHOTO).convert("RGB")) * (alpha[..., None] > 0)
    PIL.Image.fromarray(np.dstack([rgba, alpha]).astype(np.uint8)).save(tmp_path / "logo.png")
    upload = {"path": str(tmp_path / "logo.png"), "orig_name": "logo.png"}
    gallery, slider, process, _ = run(upload, "x4", 1, "ddim", 0, 1, 1.0, False)
    bicubic_alpha = np.asarray(PIL.Image.fromarray(alpha).resize((64, 64), PIL.Image.BICUBIC))
    nearest_alpha = np.asarray(PIL.Image.fromarray(alpha).resize((64, 64), PIL.Image.NEAREST))
    assert len(gallery) == 4  # input, bicubic, SR3 fidelity, SR3 detail
    for index, (picture, label) in enumerate(gallery):
        assert picture.mode == "RGBA", label
        expected = nearest_alpha if index == 0 else bicubic_alpha
        assert np.array_equal(np.asarray(picture.getchannel("A")), expected), label
    for picture in slider:
        assert np.array_equal(np.asarray(picture.getchannel("A")), bicubic_alpha)
    assert np.asarray(slider[1])[:, :16, 3].min() == 255 and np.asarray(slider[1])[:, 48:, 3].max() == 0
    # The refinement strip (the upsampled input, then 1 snapshot) showed the colour stored under the transparency.
    strip = PIL.Image.open(process.value["path"])  # as gradio wrote it for the page
    assert strip.mode == "RGBA" and strip.size == (128, 64)
    for cell in (0, 64):
        assert np.array_equal(np.asarray(strip.getchannel("A"))[:, cell : cell + 64], bicubic_alpha)


def test_an_undecodable_tiff_is_named_as_such(tmp_path):
    """A 32-bit float RGB TIFF was reported as "not an image this demo can read (PNG, JPEG, WebP, BMP, TIFF, ...)"."""
    app = load_app()
    path = tmp_path / "render.tif"
    path.write_bytes(float_rgb_tiff())
    with pytest.raises(gradio.Error, match=r"render\.tif is .*: a TIFF layout Pillow cannot decode \(such as 32-bit"):
        app.read_upload(str(path), "render.tif", 1000)


def test_garbled_exif_is_shown_to_the_user_at_every_upload(tmp_path, monkeypatch):
    """The warning that a photo's EXIF orientation could not be read reached only the server log."""
    app = load_app()
    shown = []
    monkeypatch.setattr(gradio, "Warning", shown.append)
    pixels = np.random.default_rng(0).integers(0, 256, (6, 12, 3), dtype=np.uint8)
    path = _garbled_exif_jpeg(tmp_path / "upload.jpg", pixels)
    for _ in range(2):  # the same photo uploaded again (another visitor): warned again
        assert app.read_upload(str(path), "IMG_0001.jpg", 1000).size == (12, 6)
    assert len(shown) == 2 and shown[0].startswith("IMG_0001.jpg: its EXIF orientation could not be read (")
    assert app.read_upload(str(PHOTO), "face.png", 1000) and len(shown) == 2


def test_a_cancelled_request_stops_refining_and_the_next_runs_as_on_a_fresh_pipeline(tmp_path, monkeypatch):
    with serving(tmp_path, max_pixels=MAX_PIXELS) as (app, pipeline, demo, url):
        evaluations, cancelled, ended = [], threading.Event(), threading.Event()

        def evaluated(*args):
            evaluations.append(threading.get_ident())
            if len(evaluations) == 2:  # the second evaluation ends only once the request has been cancelled
                assert cancelled.wait(30)

        def super_resolve(*args, **kwargs):
            try:
                return run_alone(*args, **kwargs)
            finally:
                ended.set()

        run_alone = app.super_resolve
        monkeypatch.setattr(app, "super_resolve", super_resolve)
        hook = pipeline.unet.register_forward_hook(evaluated)
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        job = client.submit(handle_file(str(PHOTO)), "x4", 100, "ddpm", 0, 0, 1.0, False, api_name="/super_resolve")
        while len(evaluations) < 2:
            assert not job.done(), job.exception()
            threading.Event().wait(0.01)
        job.cancel()
        while demo._queue.event_ids_to_events:  # the server has dropped the event
            threading.Event().wait(0.01)
        cancelled.set()
        assert ended.wait(30)
        assert len(evaluations) == 2  # not the 100 steps, run for nobody
        hook.remove()

        # The next request is the fresh pipeline's result.
        gallery = predict(client, PHOTO)[0]
        fresh = app.load_pipeline(save_tiny_model(tmp_path / "fresh"), device="cpu")
        direct = tiled_super_resolve(
            app.with_scheduler(fresh, "ddim"),
            PIL.Image.open(PHOTO).convert("RGB"),
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
        assert np.abs(pixels(gallery[2]["image"]) - np.asarray(direct, dtype=np.int16)).max() <= 1


def test_a_request_over_the_memory_available_is_refused_before_any_evaluation(served, monkeypatch):
    app, pipeline = served.app, served.pipeline
    evaluations = []
    hook = pipeline.unet.register_forward_hook(lambda *args: evaluations.append(1))
    # A 64x64 output needs full_size_bytes((64, 64)) = 491,520 bytes, + 49,152 per process frame.
    monkeypatch.setattr(app, "available_memory", lambda device: (500_000, "available"), raising=False)
    try:
        with pytest.raises(
            AppError,
            match=r"00031\.png: a 64x64 output needs at least 0\.0 GB of memory, 0\.0 GB "
            r"available on this server now: try a smaller photo or fewer refinement-process frames",
        ):
            predict(served.client, PHOTO, frames=1)
        assert not evaluations
        assert len(predict(served.client, PHOTO)[0]) == 3  # without frames it fits
    finally:
        hook.remove()


def test_the_memory_check_counts_only_the_process_frames_the_refinement_stores(monkeypatch):
    # super_resolve keeps at most one snapshot per step that runs: fewer steps than frames, or a strength below 1,
    # store fewer frames than asked for.
    app = load_app()
    torch.manual_seed(0)
    pipeline = SR3Pipeline(SR3UNet2DModel(**tiny_unet_config()).eval(), make_scheduler("ddpm"), upscale_factor=4)
    # A 16x16 upload: a 64x64 output needs full_size_bytes((64, 64)) = 491,520 bytes, + 49,152 per stored frame.
    monkeypatch.setattr(app, "available_memory", lambda device: (600_000, "available"))
    app.check_memory(pipeline, "a.png", (16, 16), 10, 2)  # 2 steps: 2 frames
    app.check_memory(pipeline, "a.png", (16, 16), 10, 4, strength=0.5)  # 2 of the 4 steps run
    with pytest.raises(gradio.Error, match=r"a\.png: a 64x64 output needs at least 0\.0 GB of memory"):
        app.check_memory(pipeline, "a.png", (16, 16), 10, 4)  # 4 frames: 688,128 bytes


def test_the_refinement_strip_is_a_preview_sized_for_a_page(monkeypatch):
    """At full size, 12 snapshots of a 1024x1024 result made a 13312x1024 PNG of about 30 MB, shown about 60 pixels
    a frame: too heavy for a phone or a slow link. The strip's frames are scaled down; the results keep their size."""
    app = load_app()
    monkeypatch.setattr(backends, "fast_bfloat16", lambda device: False)
    image = PIL.Image.open(PHOTO).convert("RGB").resize((72, 72), PIL.Image.BICUBIC)
    result = app.super_resolve(tiny_clean_image_pipeline(), image, 4, 1, "ddim", seed=0, process_frames=1)
    assert result.sr3.size == result.bicubic.size == (288, 288)
    assert app.PROCESS_FRAME_HEIGHT == 256 and result.process.size == (2 * 256, 256)
    # The last frame is the result, scaled down.
    shrunk = np.asarray(result.sr3.resize((256, 256), PIL.Image.BICUBIC), dtype=np.int16)
    assert np.abs(np.asarray(result.process, dtype=np.int16)[:, 256:] - shrunk).mean() < 1
    # Taller frames keep their aspect ratio; frames small enough already are left as they are.
    assert app.preview_frame(result.sr3.resize((600, 400))).size == (384, 256)
    assert app.preview_frame(result.sr3.resize((100, 400))).size == (64, 256)
    assert app.preview_frame(result.sr3.resize((300, 200))).size == (300, 200)


def test_the_refinement_strip_of_a_wide_photo_is_a_preview_too():
    """Frames were bounded in height only: a 1024x64 panorama's 4096x256 result is no taller than 256 pixels, so its
    13 frames made a 53248x256 strip, as heavy as a 1024x1024 result's at full size. Small frames are not enlarged."""
    app = load_app()
    limit = app.PROCESS_FRAME_PIXELS
    assert limit == 512 * 256
    for size in [(4096, 256), (1536, 256), (1537, 257), (262144, 4)]:
        width, height = app.preview_frame(PIL.Image.new("RGB", size)).size
        assert height <= 256 and width * height <= limit
    assert app.preview_frame(PIL.Image.new("RGB", (4096, 256))).size == (1448, 90)
    assert app.preview_frame(PIL.Image.new("RGB", (1536, 256))).size == (886, 147)
    # Landscape photos up to 2:1 keep the full preview height; frames already small enough are left as they are.
    assert app.preview_frame(PIL.Image.new("RGB", (2048, 1024))).size == (512, 256)
    for size in [(240, 4), (4, 240), (512, 256), (1, 1)]:
        assert app.preview_frame(PIL.Image.new("RGB", size)).size == size


def test_every_picture_and_example_is_named_for_screen_readers(monkeypatch):
    """The examples were buttons without a name (a screen reader said "button" three times) and the uploaded photo
    and the refinement strip had no alt text (gradio marks such pictures decorative)."""
    app = load_app()
    monkeypatch.setattr(backends, "fast_bfloat16", lambda device: False)
    demo = app.build_demo(tiny_clean_image_pipeline(), examples=app.example_images())
    pictures = [
        block for block in demo.blocks.values() if isinstance(block, (gradio.Image, gradio.Gallery, gradio.ImageSlider))
    ]
    assert len(pictures) == 4 and all(block.label and block.show_label is not False for block in pictures)
    upload = next(block for block in pictures if block.label == "low-resolution photo")
    assert upload.alt_text == "the photo to super-resolve"
    examples = next(block for block in demo.blocks.values() if isinstance(block, gradio.Dataset))
    assert examples.label == "example photos"
    assert examples.sample_labels == ["an astronaut's portrait, 64x64", "a cat, 96x64", "a cup of coffee, 96x64"]
    run = next(function for function in demo.fns.values() if function.api_name == "super_resolve")
    _, _, process, _ = run.fn({"path": str(PHOTO), "orig_name": "face.png"}, "x4", 2, "ddim", 0, 1, 1.0, False)
    assert process.alt_text == (
        "refinement process, left to right: the bicubic-upsampled input, then 1 snapshot of SR3's refinement, "
        "from its noisy start to the result (the last)"
    )
    _, _, process, _ = run.fn({"path": str(PHOTO), "orig_name": "face.png"}, "x4", 2, "ddim", 0, 0, 1.0, False)
    assert process.visible is False and not process.alt_text


def test_an_animation_is_upscaled_from_its_first_frame_and_says_so(tmp_path, monkeypatch):
    """`sr3 upscale` notes that only an animation's first frame is upscaled; the Space said nothing."""
    app = load_app()
    shown = []
    monkeypatch.setattr(gradio, "Warning", shown.append)
    first = PIL.Image.open(PHOTO).convert("RGB")
    first.save(tmp_path / "clip.gif", save_all=True, append_images=[first.rotate(90), first.rotate(180)])
    assert app.read_upload(str(tmp_path / "clip.gif"), "clip.gif", 1000).size == (16, 16)
    assert shown == ["clip.gif has 3 frames (an animation or a multi-page file): only the first is upscaled"]
    app.read_upload(str(PHOTO), "face.png", 1000)
    assert len(shown) == 1


def test_a_jpeg_with_a_gain_map_or_preview_is_no_animation(tmp_path, monkeypatch):
    """Pillow counts a JPEG's multi-picture extras (an Ultra HDR phone photo's gain map, a camera's preview) as frames:
    such a photo was announced as "an animation or a multi-page file", though its first picture is the photo."""
    app = load_app()
    shown = []
    monkeypatch.setattr(gradio, "Warning", shown.append)
    photo = PIL.Image.open(PHOTO).convert("RGB")
    photo.save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[photo.convert("L").convert("RGB")])
    assert PIL.Image.open(tmp_path / "phone.jpg").n_frames == 2
    assert app.read_upload(str(tmp_path / "phone.jpg"), "phone.jpg", 1000).size == (16, 16)
    assert shown == []
