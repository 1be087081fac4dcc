"""`sr3 upscale` and `sr3 sample` on real files with tiny saved pipelines."""

import errno
import io
import os
import shutil
import signal
import time

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import SAMPLES, tiny_unet_config

from diffusers_sr3 import SR3Pipeline, SR3UnconditionalPipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.cli import build_parser, main
from diffusers_sr3.image_io import is_grayscale, open_image
from diffusers_sr3.pipelines.pipeline_sr3 import FIDELITY_STEPS

LR_SAMPLE = SAMPLES / "celebahq_16_128" / "lr_16" / "00031.png"


@pytest.fixture
def model_dir(tiny_pipeline, tmp_path):
    folder = tmp_path / "model"
    tiny_pipeline.save_pretrained(folder)
    return folder


def write_image(path, size, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_upscale_files_folders_and_globs(model_dir, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    write_image(inputs / "a.png", (8, 8), 1)
    write_image(inputs / "nested" / "b.jpg", (8, 8), 2)
    write_image(tmp_path / "other" / "c.png", (6, 5), 3)
    out = tmp_path / "out"
    arguments = ["upscale", str(inputs), str(tmp_path / "other" / "*.png"), str(LR_SAMPLE)]
    arguments += ["--model", str(model_dir), "--output", str(out), "--steps", "2", "--batch-size", "2"]
    assert main(arguments + ["--scheduler", "ddim", "--device", "cpu", "--dtype", "float32"]) == 0
    sizes = {path.relative_to(out).as_posix(): PIL.Image.open(path).size for path in out.rglob("*.png")}
    # Files found in a folder keep their subfolder under --output.
    assert sizes == {
        "a_sr.png": (32, 32),
        "nested/b_sr.png": (32, 32),
        "c_sr.png": (24, 20),
        "00031_sr.png": (64, 64),
    }
    assert "00031_sr.png (64x64)" in capsys.readouterr().out
    # Same seed, same result; another seed, another.
    first = np.asarray(PIL.Image.open(out / "a_sr.png"))
    assert main(arguments + ["--scheduler", "ddim", "--overwrite"]) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(out / "a_sr.png")), first)
    assert main(arguments + ["--scheduler", "ddim", "--seed", "1", "--overwrite"]) == 0
    assert not np.array_equal(np.asarray(PIL.Image.open(out / "a_sr.png")), first)


def test_upscale_one_file_to_a_file_name_with_the_refinement_strip(model_dir, tmp_path):
    out = tmp_path / "result.png"
    assert (
        main(
            ["upscale", str(LR_SAMPLE), "--model", str(model_dir), "--output", str(out), "--steps", "3"]
            + ["--save-process", "3"]
        )
        == 0
    )
    assert PIL.Image.open(out).size == (64, 64)
    strip = PIL.Image.open(tmp_path / "result_process.png")
    assert strip.size == (64 * 4, 64)  # the condition and 3 snapshots
    strip = np.asarray(strip).astype(int)
    # The first frame is the bicubic condition: smooth, unlike the noisy first snapshot.
    roughness = [np.abs(np.diff(strip[:, 64 * k : 64 * (k + 1)], axis=1)).mean() for k in range(2)]
    assert roughness[0] < roughness[1]


def test_upscale_larger_than_the_model_goes_through_tiles(model_dir, tmp_path, monkeypatch):
    import diffusers_sr3.tiling as tiling

    calls = []
    original = tiling.TiledNetwork.forward

    def counting_forward(self, sample, noise_level, **kwargs):
        calls.append(len(self.tiles(*sample.shape[-2:])))
        return original(self, sample, noise_level, **kwargs)

    monkeypatch.setattr(tiling.TiledNetwork, "forward", counting_forward)
    source = write_image(tmp_path / "big.png", (20, 14))  # 80x56 output; the model was trained at 32x32
    out = tmp_path / "out"
    # By default an image that fits the memory budget runs whole: one evaluation per step.
    assert main(["upscale", str(source), "--model", str(model_dir), "--output", str(out), "--steps", "2"]) == 0
    assert PIL.Image.open(out / "big_sr.png").size == (80, 56)
    assert calls == [1, 1]
    calls.clear()
    assert (
        main(
            ["upscale", str(source), "--model", str(model_dir), "--output", str(out), "--steps", "2"]
            + ["--tile-size", "32", "--tile-overlap", "8", "--tile-batch-size", "4", "--overwrite"]
        )
        == 0
    )
    assert PIL.Image.open(out / "big_sr.png").size == (80, 56)
    assert calls == [3 * 2, 3 * 2]  # 2 steps, each over a 3 x 2 grid of 32x32 tiles
    calls.clear()
    # A smaller memory budget cuts the same image into tiles on its own.
    assert (
        main(
            ["upscale", str(source), "--model", str(model_dir), "--output", str(out), "--steps", "1"]
            + ["--max-tile-pixels", str(40 * 40), "--overwrite"]
        )
        == 0
    )
    assert calls and calls[0] > 1
    calls.clear()
    assert (
        main(
            ["upscale", str(source), "--model", str(model_dir), "--output", str(out), "--steps", "1"]
            + ["--tile-size", "64", "--overwrite"]
        )
        == 0
    )
    assert calls == [2 * 1]


def test_upscale_bad_inputs(model_dir, tmp_path, capsys):
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    assert main(["upscale", str(corrupt), "--model", str(model_dir), "--output", str(out)]) == 2
    assert "cannot read image" in capsys.readouterr().err and not out.exists()
    assert main(["upscale", str(tmp_path / "missing*.png"), "--model", str(model_dir), "--output", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["upscale", str(LR_SAMPLE), "--model", str(tmp_path), "--output", str(out)]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert main(["upscale", str(LR_SAMPLE), "--model", str(model_dir), "--output", str(out), "--batch-size", "0"]) == 2


def test_sample_writes_a_grid(tmp_path):
    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config(in_channels=3, sample_size=16))
    SR3UnconditionalPipeline(unet, make_scheduler("ddpm", n_timestep=50)).save_pretrained(tmp_path / "uncond")
    out = tmp_path / "grid.png"
    assert (
        main(
            ["sample", "--model", str(tmp_path / "uncond"), "-n", "5", "--output", str(out), "--steps", "4"]
            + ["--batch-size", "2", "--scheduler", "ddim", "--save-process", "3"]
        )
        == 0
    )
    assert PIL.Image.open(out).size == (3 * 16, 2 * 16)
    assert PIL.Image.open(tmp_path / "grid_process.png").size == (3 * 16, 5 * 16)  # 3 frames for each image
    grid = np.asarray(PIL.Image.open(out))
    assert grid[:16, :16].std() > 0 and np.array_equal(grid[16:, 32:], np.full((16, 16, 3), 255))


def test_sample_refuses_a_super_resolution_model(model_dir, tmp_path, capsys):
    assert main(["sample", "--model", str(model_dir), "--output", str(tmp_path / "g.png")]) == 2
    assert "needs a SR3UnconditionalPipeline" in capsys.readouterr().err


def test_upscale_defaults_to_the_packaged_model(tmp_path):
    """README: `sr3 upscale photo.jpg --output upscaled/` works on a fresh install with no --model (x4: 16 -> 64)."""
    photo = tmp_path / "photo.jpg"
    PIL.Image.open(SAMPLES / "celebahq_16_128" / "lr_16" / "00031.png").save(photo)
    assert main(["upscale", str(photo), "--output", str(tmp_path / "upscaled"), "--steps", "2"]) == 0
    assert PIL.Image.open(tmp_path / "upscaled" / "photo_sr.png").size == (64, 64)


def test_upscale_samples_with_the_models_own_detail_settings(tmp_path, monkeypatch, model_dir, capsys):
    import json

    from diffusers_sr3 import tiling
    from diffusers_sr3.pretrained import (
        DEFAULT_DETAIL_OPTIONS,
        DEFAULT_DETAIL_WINDOW_SIZE,
        DEFAULT_STEPS,
        default_model_path,
    )

    seen, options = [], []
    real = tiling.tiled_super_resolve  # `sr3 upscale` imports it when it runs

    def recording(*args, **kwargs):
        seen.append(kwargs["num_inference_steps"])
        options.append({name: kwargs[name] for name in ("eta", "strength") if name in kwargs})
        # 3 steps: the fewest that strength 0.6 leaves a step of and that start from noise on leading spacing.
        return real(*args, **dict(kwargs, num_inference_steps=3))

    monkeypatch.setattr(tiling, "tiled_super_resolve", recording)
    photo = tmp_path / "photo.png"
    PIL.Image.new("RGB", (16, 16), (90, 120, 200)).save(photo)
    packaged = default_model_path()
    # A copy of the test model saved by an earlier version: no detail keys in its model_index.json.
    earlier = tmp_path / "earlier"
    shutil.copytree(model_dir, earlier)
    index = json.loads((earlier / "model_index.json").read_text(encoding="utf-8"))
    index = {key: value for key, value in index.items() if not key.startswith("detail_")}
    (earlier / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    detail = ["--mode", "detail"]
    runs = {
        "packaged": [],
        "test model": ["--model", str(model_dir)],
        "earlier test model": ["--model", str(earlier)],
        "packaged, detail": detail,
        "packaged by path, detail": ["--model", packaged] + detail,
        "packaged, another sampler, detail": ["--scheduler", "ddpm"] + detail,
        "packaged, detail, told": detail + ["--steps", "3", "--strength", "1", "--eta", "0"],
    }
    printed = []
    for name, extra in runs.items():
        output = tmp_path / name.replace(" ", "_").replace(",", "")
        assert main(["upscale", str(photo), "--output", str(output)] + extra) == 0, name
        printed.append(capsys.readouterr().out.splitlines()[0])
    # The packaged model predicts the clean image: fidelity mode by default, FIDELITY_STEPS steps.
    # The test models predict epsilon: detail mode at 50 steps, strength 1, the sampler's eta (DDPM takes none). The
    # packaged model's detail mode runs the settings its pipeline config stores, also loaded by path (as `--model`
    # finds it) and with another sampler, which keeps the steps and strength and drops eta where it takes none.
    # The command line overrides each of them.
    plain = {"eta": None, "strength": 1.0}
    studied = dict(DEFAULT_DETAIL_OPTIONS)
    assert seen == [FIDELITY_STEPS, 50, 50, DEFAULT_STEPS, DEFAULT_STEPS, DEFAULT_STEPS, 3]
    assert options == [{}, plain, plain, studied, studied, {**studied, "eta": None}, {"eta": 0.0, "strength": 1.0}]
    # Each run says what it runs (the packaged model's guide doubles its refinement steps).
    fidelity = f"fidelity mode: {FIDELITY_STEPS} deterministic DDIM steps"
    assert printed[0] == f"{fidelity} ({FIDELITY_STEPS} network evaluations per tile)"
    studied_line = "detail mode: 10 DDIMScheduler steps, strength 0.6, eta 1, guidance scale 2, window size 64"
    evaluations = FIDELITY_STEPS + 2 * 6  # the fidelity answer, then the last 6 of 10 steps, each also the guide's
    assert printed[3] == printed[4] == f"{studied_line} ({evaluations} network evaluations per tile)"
    # Fidelity mode always runs DDIM: another sampler is refused there, not silently ignored.
    assert main(["upscale", str(photo), "--output", str(tmp_path / "refused"), "--scheduler", "ddpm"]) == 2
    assert "--scheduler applies to detail mode (--mode detail)" in capsys.readouterr().err
    config = SR3Pipeline.load_config(packaged)
    assert (config["detail_steps"], config["detail_eta"], config["detail_strength"], config["detail_window_size"]) == (
        DEFAULT_STEPS,
        DEFAULT_DETAIL_OPTIONS["eta"],
        DEFAULT_DETAIL_OPTIONS["strength"],
        DEFAULT_DETAIL_WINDOW_SIZE,
    )


def test_upscale_keeps_transparency_where_the_output_format_can(model_dir, tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    alpha = np.tile(np.linspace(0, 255, 8).round().astype(np.uint8), (8, 1))  # transparent left, opaque right
    PIL.Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "logo.png")
    options = ["--model", str(model_dir), "--steps", "1"]
    assert main(["upscale", str(tmp_path / "logo.png"), "--output", str(tmp_path / "logo_sr.png")] + options) == 0
    result = PIL.Image.open(tmp_path / "logo_sr.png")
    expected = PIL.Image.fromarray(alpha).resize((32, 32), PIL.Image.BICUBIC)
    assert result.mode == "RGBA" and np.array_equal(np.asarray(result.getchannel("A")), np.asarray(expected))
    # The colours are the network's answer for the RGB alone: as without transparency.
    PIL.Image.fromarray(rgb).save(tmp_path / "opaque.png")
    assert main(["upscale", str(tmp_path / "opaque.png"), "--output", str(tmp_path / "opaque_sr.png")] + options) == 0
    opaque = PIL.Image.open(tmp_path / "opaque_sr.png")
    assert opaque.mode == "RGB" and np.array_equal(np.asarray(result.convert("RGB")), np.asarray(opaque))
    # The process strip is a PNG whatever the result's format: its frames keep the transparency, cell by cell.
    process = ["--output", str(tmp_path / "strip.jpg"), "--save-process", "2", "--mode", "detail"]
    assert main(["upscale", str(tmp_path / "logo.png")] + options + process) == 0
    strip = PIL.Image.open(tmp_path / "strip_process.png")
    frames = strip.width // 32  # the upsampled input and the snapshots of the one step
    assert strip.mode == "RGBA" and strip.size == (frames * 32, 32) and frames >= 2
    assert np.array_equal(np.asarray(strip.getchannel("A")), np.tile(np.asarray(expected), (1, frames)))
    # JPEG has no transparency: RGB, as before. A palette PNG's transparent index is transparency too.
    assert main(["upscale", str(tmp_path / "logo.png"), "--output", str(tmp_path / "logo_sr.jpg")] + options) == 0
    assert PIL.Image.open(tmp_path / "logo_sr.jpg").mode == "RGB"
    # AVIF stores transparency (this Pillow writes AVIF), lossily at --quality 95: within a level of it.
    assert main(["upscale", str(tmp_path / "logo.png"), "--output", str(tmp_path / "logo_sr.avif")] + options) == 0
    avif = PIL.Image.open(tmp_path / "logo_sr.avif")
    assert avif.mode == "RGBA" and np.abs(np.asarray(avif.getchannel("A"), int) - np.asarray(expected)).max() <= 1
    palette = PIL.Image.fromarray(np.repeat(np.array([[0] * 4 + [1] * 4], dtype=np.uint8), 8, axis=0), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.save(tmp_path / "sticker.png", transparency=0)  # index 0, the left half, is transparent
    assert main(["upscale", str(tmp_path / "sticker.png"), "--output", str(tmp_path / "s.png")] + options) == 0
    kept = np.asarray(PIL.Image.open(tmp_path / "s.png").getchannel("A"))
    assert (kept[:, :12] == 0).all() and (kept[:, 20:] == 255).all()


def test_upscale_keeps_black_and_white_photos_gray(model_dir, tmp_path):
    """A tiny untrained network tints gray inputs; the written result is gray again, colour inputs stay colour."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    PIL.Image.fromarray(gray).save(tmp_path / "bw.png")
    PIL.Image.fromarray(np.dstack([gray] * 3)).save(tmp_path / "bw_as_rgb.png")  # a B&W photo stored as RGB
    PIL.Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "bw16.png")  # 16-bit gray
    PIL.Image.fromarray(np.dstack([gray, gray[::-1]]), "LA").save(tmp_path / "bw_alpha.png")
    PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "colour.png")
    options = ["--model", str(model_dir), "--steps", "1", "--quiet"]
    assert main(["upscale", str(tmp_path / "colour.png"), "--output", str(tmp_path / "colour_sr.png")] + options) == 0
    tinted = np.asarray(PIL.Image.open(tmp_path / "colour_sr.png")).astype(int)
    assert PIL.Image.open(tmp_path / "colour_sr.png").mode == "RGB" and np.ptp(tinted, axis=2).max() > 0
    results = []
    for name in ("bw", "bw_as_rgb", "bw16"):  # one call each: the same seed draws the same noise
        assert (
            main(["upscale", str(tmp_path / f"{name}.png"), "--output", str(tmp_path / f"{name}_sr.png")] + options)
            == 0
        )
        results.append(PIL.Image.open(tmp_path / f"{name}_sr.png"))
    # 16-bit gray is written 16-bit (see test_upscale_keeps_16_bit_gray_at_16_bits).
    assert [result.mode for result in results] == ["L", "L", "I;16"] and results[0].size == (32, 32)
    # The same gray picture, however stored, gives the same result: the luma of the network's answer.
    assert np.array_equal(np.asarray(results[0]), np.asarray(results[1]))
    assert np.abs(np.asarray(results[2]) / 257 - np.asarray(results[0])).max() <= 1
    for extension in (".png", ".webp", ".jpg"):
        destination = tmp_path / f"bw_alpha_sr{extension}"
        assert main(["upscale", str(tmp_path / "bw_alpha.png"), "--output", str(destination)] + options) == 0
        written = PIL.Image.open(destination)
        if extension == ".jpg":  # no transparency in JPEG
            assert written.mode == "L"
        else:
            assert written.mode in ("LA", "RGBA") and written.getchannel("A").getextrema() == (0, 255)
            # WebP stores gray as colour, lossily: within a level or two of gray, not the network's tint.
            spread = np.ptp(np.asarray(written.convert("RGB")).astype(int), axis=2).max()
            assert is_grayscale(written.convert("RGB")) if extension == ".png" else spread <= 2


def test_upscale_writes_jpeg_webp_and_avif_at_the_chosen_quality(model_dir, tmp_path, capsys):
    import PIL.JpegImagePlugin

    write_image(tmp_path / "photo.png", (16, 16))
    options = ["--model", str(model_dir), "--steps", "1", "--quiet"]
    sizes = {}
    for extension, quality in ((".jpg", None), (".jpg", "75"), (".webp", None), (".webp", "75")):
        destination = tmp_path / f"out_{quality}{extension}"
        chosen = ["--quality", quality] if quality else []
        assert main(["upscale", str(tmp_path / "photo.png"), "--output", str(destination)] + options + chosen) == 0
        sizes[extension, quality] = destination.stat().st_size
    # The default, 95, keeps more than Pillow's own defaults; JPEG keeps colour at full resolution (4:4:4).
    assert sizes[".jpg", None] > sizes[".jpg", "75"] and sizes[".webp", None] > sizes[".webp", "75"]
    assert PIL.JpegImagePlugin.get_sampling(PIL.Image.open(tmp_path / "out_None.jpg")) == 0
    if PIL.Image.registered_extensions().get(".avif") in PIL.Image.SAVE:  # Pillow builds with AVIF (11.2 and later)
        for quality in (None, "75"):
            destination = tmp_path / f"out_{quality}.avif"
            chosen = ["--quality", quality] if quality else []
            assert main(["upscale", str(tmp_path / "photo.png"), "--output", str(destination)] + options + chosen) == 0
            sizes[".avif", quality] = destination.stat().st_size
        assert sizes[".avif", None] > sizes[".avif", "75"]
    for bad in ("0", "101"):
        bad_run = ["upscale", str(tmp_path / "photo.png"), "--output", str(tmp_path / "bad.jpg"), "--quality", bad]
        assert main(bad_run) == 2
        assert "--quality must lie in 1-100" in capsys.readouterr().err and not (tmp_path / "bad.jpg").exists()


def test_upscale_refuses_a_scheduler_the_model_cannot_use(tmp_path, capsys):
    photo = tmp_path / "photo.png"
    PIL.Image.new("RGB", (16, 16), (90, 120, 200)).save(photo)
    out = tmp_path / "out"
    detail = ["upscale", str(photo), "--output", str(out), "--mode", "detail"]
    assert main(detail + ["--scheduler", "euler_ancestral"]) == 2
    assert "cannot sample a model that predicts 'sample'" in capsys.readouterr().err
    assert not out.exists()
    # DDIM's eta above 1 asks for more step noise than the schedule leaves: NaN after the whole run, refused first.
    for eta in ("-0.5", "5"):
        assert main(detail + ["--eta", eta]) == 2
        assert f"--eta must lie in [0, 1], got {float(eta):g}" in capsys.readouterr().err
    # Infinite or NaN starting noise ran the whole refinement before the scheduler was blamed for the NaN.
    for temperature in ("-1", "inf", "nan"):
        assert main(detail + ["--temperature", temperature]) == 2
        assert f"--temperature must be finite and at least 0, got {temperature}" in capsys.readouterr().err
    assert not out.exists()
    for steps in ("0", "-3", "ten"):
        with pytest.raises(SystemExit) as stopped:  # argparse's usage error
            main(["upscale", str(photo), "--output", str(out), "--steps", steps])
        assert stopped.value.code == 2 and "argument --steps" in capsys.readouterr().err
    assert not out.exists()


def test_upscale_never_overwrites_silently_nor_leaves_partial_files(model_dir, tmp_path, capsys, monkeypatch):
    from diffusers_sr3.commands import upscale

    source = write_image(tmp_path / "in" / "a.png", (8, 8))
    out = tmp_path / "out"
    arguments = ["upscale", str(source), "--model", str(model_dir), "--output", str(out), "--steps", "1"]
    assert main(arguments) == 0
    previous = (out / "a_sr.png").read_bytes()
    # An existing result is refused by name, before any work; --overwrite replaces it.
    assert main(arguments + ["--seed", "1"]) == 2
    error = capsys.readouterr().err
    assert f"{out / 'a_sr.png'} already exists" in error and "--overwrite" in error
    assert (out / "a_sr.png").read_bytes() == previous
    assert main(arguments + ["--seed", "1", "--overwrite"]) == 0
    replaced = (out / "a_sr.png").read_bytes()
    assert replaced != previous and sorted(path.name for path in out.iterdir()) == ["a_sr.png"]
    # Two inputs that would land on one file are refused too.
    other = write_image(tmp_path / "elsewhere" / "a.png", (8, 8), seed=5)
    assert main(arguments[:2] + [str(other)] + arguments[2:] + ["--overwrite"]) == 2
    assert "would both be written to" in capsys.readouterr().err

    # A write that fails half-way (disk full, a crash) leaves the previous file and no partial or temporary file.
    def failing_save(self, stream, format=None, **kwargs):
        stream.write(b"\x89PNG partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(PIL.Image.Image, "save", failing_save)
    assert main(arguments + ["--seed", "2", "--overwrite"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(path.name for path in out.iterdir()) == ["a_sr.png"] and (out / "a_sr.png").read_bytes() == replaced
    assert (
        main(["upscale", str(source), "--model", str(model_dir), "--output", str(tmp_path / "new"), "--steps", "1"])
        == 2
    )
    assert "No space left on device" in capsys.readouterr().err
    assert list((tmp_path / "new").iterdir()) == []
    with pytest.raises(OSError):
        upscale.save_atomically(PIL.Image.new("RGB", (4, 4)), str(tmp_path / "direct.png"))
    assert not list(tmp_path.glob("*direct*"))


def test_a_dangling_symlink_at_a_destination_is_refused_before_any_work(model_dir, tmp_path, capsys, monkeypatch):
    from diffusers_sr3.commands import upscale

    source = write_image(tmp_path / "in.png", (8, 8))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "in_sr.png").symlink_to(tmp_path / "nowhere.png")
    monkeypatch.setattr(upscale, "load_pipeline", lambda *args, **kwargs: pytest.fail("the model loaded"))
    arguments = ["upscale", str(source), "--model", str(model_dir), "--output", str(tmp_path / "out")]
    assert main(arguments) == 2
    assert "in_sr.png already exists; pass --overwrite" in capsys.readouterr().err


def test_upscale_keeps_a_result_another_run_wrote_meanwhile(model_dir, tmp_path, capsys, monkeypatch):
    from diffusers_sr3.commands import upscale

    sources = [write_image(tmp_path / "in" / f"{name}.png", (8, 8)) for name in "ab"]
    out = tmp_path / "out"
    arguments = ["upscale", *map(str, sources), "--model", str(model_dir), "--output", str(out), "--steps", "1"]
    checked = upscale.check_destinations

    # Another run into the same folder writes b_sr.png after this one checked its destinations.
    def another_run_writes_after_the_check(writes, overwrite):
        checked(writes, overwrite)
        out.mkdir(exist_ok=True)
        (out / "b_sr.png").write_bytes(b"the other run's result")

    monkeypatch.setattr(upscale, "check_destinations", another_run_writes_after_the_check)
    assert main(arguments) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"sr3 upscale: error: {out / 'b_sr.png'} already exists; pass --overwrite to replace it, or choose another "
        "--output"
    )
    assert (out / "b_sr.png").read_bytes() == b"the other run's result"
    assert sorted(path.name for path in out.iterdir()) == ["a_sr.png", "b_sr.png"]  # no temporary left
    assert main(arguments + ["--overwrite"]) == 0
    assert PIL.Image.open(out / "b_sr.png").size == (32, 32)


def _windows_incorrect_function(source, destination):
    """What os.link raises on Windows for an exFAT/FAT32 volume: [WinError 1] Incorrect function."""
    error = OSError(None, "Incorrect function", source, None, destination)
    error.winerror = 1
    return error


@pytest.mark.parametrize(
    "refusal",
    [
        *(
            lambda source, destination, code=code: OSError(code, os.strerror(code), source, None, destination)
            for code in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EINVAL)
        ),
        _windows_incorrect_function,
    ],
)
def test_without_hard_links_a_result_written_meanwhile_is_still_kept(tmp_path, monkeypatch, refusal):
    from diffusers_sr3.commands import upscale

    def no_hard_links(source, destination):
        raise refusal(source, destination)

    monkeypatch.setattr(os, "link", no_hard_links)
    image, destination = PIL.Image.new("RGB", (4, 4)), tmp_path / "a.png"
    upscale.save_atomically(image, str(destination), overwrite=False)
    assert PIL.Image.open(destination).size == (4, 4)
    with pytest.raises(FileExistsError, match=f"{destination} already exists; pass --overwrite"):
        upscale.save_atomically(PIL.Image.new("RGB", (8, 8)), str(destination), overwrite=False)
    assert PIL.Image.open(destination).size == (4, 4) and sorted(tmp_path.iterdir()) == [destination]
    upscale.save_atomically(PIL.Image.new("RGB", (8, 8)), str(destination), overwrite=True)
    assert PIL.Image.open(destination).size == (8, 8) and sorted(tmp_path.iterdir()) == [destination]


def test_an_output_name_near_the_filesystem_limit_is_written(tmp_path):
    from diffusers_sr3.commands import upscale

    destination = tmp_path / ("a" * 236 + ".png")  # 240 bytes, within the usual 255-byte limit
    upscale.save_atomically(PIL.Image.new("RGB", (4, 4)), str(destination), overwrite=False)
    assert sorted(tmp_path.iterdir()) == [destination]


def test_outputs_differing_only_in_case_are_refused_before_any_work(model_dir, tmp_path, capsys):
    # One file on the case-insensitive filesystems of macOS and Windows: refused everywhere, from the names alone.
    first = write_image(tmp_path / "in" / "a.png", (8, 8))
    second = write_image(tmp_path / "in" / "A.png", (8, 8), seed=1)
    if len(list((tmp_path / "in").iterdir())) < 2:
        pytest.skip("this filesystem is case-insensitive: a.png and A.png are one file")
    out = tmp_path / "out"
    arguments = ["upscale", str(tmp_path / "in"), "--model", str(model_dir), "--output", str(out), "--steps", "1"]
    for extra in ([], ["--overwrite"]):
        assert main(arguments + extra) == 2
        error = capsys.readouterr().err.splitlines()[-1]
        assert error.startswith("sr3 upscale: error: ") and "case-insensitive filesystems" in error
        assert str(first) in error and str(second) in error
        assert not out.exists()


def test_a_tilde_in_path_options_is_the_home_folder(model_dir, tmp_path, monkeypatch):
    # As given by a shell that does not expand it: `--output=~/...`, a quoted "~/...", cmd.exe.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))
    write_image(tmp_path / "in" / "a.png", (8, 8))
    monkeypatch.chdir(tmp_path / "in")
    assert main(["upscale", "~/in/a.png", "--model", str(model_dir), "--output=~/out/a.png", "--steps", "1"]) == 0
    assert PIL.Image.open(tmp_path / "out" / "a.png").size == (32, 32)
    assert not (tmp_path / "in" / "~").exists()
    parsed = build_parser().parse_args(
        ["eval", "--hr", "~/hr", "--sr=~/sr", "--lr", "~/lr", "--results", "~/r", "--json", "~/m.json"]
    )
    assert [parsed.hr, parsed.sr, parsed.lr, parsed.results, parsed.json] == [
        str(tmp_path / name) for name in ("hr", "sr", "lr", "r", "m.json")
    ]
    parsed = build_parser().parse_args(["prepare", "~/photos", "--out", "~/prepared", "--size", "16,64"])
    assert [parsed.path, parsed.output] == [str(tmp_path / "photos"), str(tmp_path / "prepared")]
    parsed = build_parser().parse_args(["sample", "--model", "~/m", "--output", "~/grid.png"])
    assert [parsed.model, parsed.output] == [str(tmp_path / "m"), str(tmp_path / "grid.png")]


def test_a_full_disk_names_the_file_being_written(model_dir, tmp_path, capsys, monkeypatch):
    source = write_image(tmp_path / "in" / "a.png", (8, 8))
    out = tmp_path / "out"

    def full_disk(self, stream, format=None, **kwargs):
        stream.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PIL.Image.Image, "save", full_disk)
    assert main(["upscale", str(source), "--model", str(model_dir), "--output", str(out), "--steps", "1"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"sr3 upscale: error: [Errno 28] cannot write {out / 'a_sr.png'}: No space left on device"
    )
    assert list(out.iterdir()) == []


def test_sigterm_exits_143_and_removes_the_temporary_file(model_dir, tmp_path, capsys, monkeypatch):
    source = write_image(tmp_path / "in" / "a.png", (8, 8))
    out = tmp_path / "out"

    class NotHandled(Exception):
        pass

    def not_handled(signum, frame):
        raise NotHandled("sr3 left SIGTERM to its previous handler")

    # The handler of whatever runs main: without sr3's own, SIGTERM reaches it (pytest survives, the test fails).
    previous = signal.signal(signal.SIGTERM, not_handled)
    try:
        # SIGTERM while the result is half-written: the handler runs at once, inside the write.
        def terminated_mid_write(self, stream, format=None, **kwargs):
            stream.write(b"\x89PNG partial")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # not reached: a Python signal handler runs as soon as os.kill returns

        monkeypatch.setattr(PIL.Image.Image, "save", terminated_mid_write)
        assert main(["upscale", str(source), "--model", str(model_dir), "--output", str(out), "--steps", "1"]) == 143
        assert capsys.readouterr().err.splitlines()[-1] == "sr3 upscale: terminated"
        assert list(out.iterdir()) == []
        assert signal.getsignal(signal.SIGTERM) is not_handled  # put back when main returns
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_upscale_progress_quiet_mode_help_and_onnx_backend(model_dir, tmp_path, capsys):
    source = write_image(tmp_path / "photo.png", (12, 10))
    base = ["upscale", str(source), "--model", str(model_dir), "--steps", "2", "--scheduler", "ddim", "--device", "cpu"]
    # One thread count for every run: results are bit-identical only at the same count (README, `--threads`).
    base += ["--backend", "torch", "--threads", "1"]
    assert main(base + ["--output", str(tmp_path / "a.png")]) == 0
    captured = capsys.readouterr()
    assert "photo_sr" not in captured.out and "a.png (48x40)" in captured.out
    # What it runs, said once: the test model's own detail settings (saved without a detail_eta, unguided).
    assert "detail mode: 2 DDIMScheduler steps, strength 1 (2 network evaluations per tile)" in captured.out
    assert "step 2/2" in captured.err and "100%" in captured.err  # the bar: steps (and tiles) with elapsed<ETA
    assert main(base + ["--output", str(tmp_path / "b.png"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "step" not in captured.err and "%" not in captured.err
    assert np.array_equal(
        np.asarray(PIL.Image.open(tmp_path / "a.png")), np.asarray(PIL.Image.open(tmp_path / "b.png"))
    )
    # Tiled: the bar counts tiles too.
    assert main(base + ["--output", str(tmp_path / "c.png"), "--tile-size", "32", "--tile-overlap", "8"]) == 0
    assert "tile 4/4" in capsys.readouterr().err
    pytest.importorskip("onnxruntime")
    import os

    os.environ["SR3_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        assert main(base + ["--output", str(tmp_path / "d.png"), "--backend", "onnx", "--quiet"]) == 0
    finally:
        del os.environ["SR3_CACHE_DIR"]
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx"))
    eager = np.asarray(PIL.Image.open(tmp_path / "a.png")).astype(int)
    onnx = np.asarray(PIL.Image.open(tmp_path / "d.png")).astype(int)
    assert np.abs(eager - onnx).max() <= 1  # fp32 to ~1e-6: at most one rounding step apart


def test_upscale_help_states_the_expected_time(capsys):
    with pytest.raises(SystemExit):
        main(["upscale", "--help"])
    text = capsys.readouterr().out
    assert "per output megapixel" in text and "GPU" in text and "--backend" in text and "--quiet" in text


def test_upscale_help_names_the_process_strip_as_it_is_written(capsys):
    from diffusers_sr3.commands.upscale import _output_path, _process_path

    with pytest.raises(SystemExit):
        main(["upscale", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # Named after the result, not the input: a.png's strip is a_sr_process.png in a folder, x_process.png for x.jpg.
    assert _process_path(_output_path("out", "a.png", False)) == os.path.join("out", "a_sr_process.png")
    assert _process_path(_output_path("x.jpg", "a.png", True)) == "x_process.png"
    assert "(a_sr_process.png beside a_sr.png; x_process.png for --output x.jpg)" in text
    assert "<name>_process.png" not in text


def test_upscale_fidelity_mode_takes_few_evaluations(model_dir, tmp_path, monkeypatch, capsys):
    import diffusers_sr3.tiling as tiling

    calls = []
    original = tiling.TiledNetwork.forward
    monkeypatch.setattr(
        tiling.TiledNetwork, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    from diffusers_sr3 import SR3Pipeline

    pipeline = SR3Pipeline.from_pretrained(model_dir)
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample")
    SR3Pipeline(pipeline.unet, scheduler, upscale_factor=4).save_pretrained(tmp_path / "x0")
    source = write_image(tmp_path / "photo.png", (12, 10))
    arguments = ["upscale", str(source), "--model", str(tmp_path / "x0"), "--output", str(tmp_path / "o.png")]
    assert main(arguments + ["--mode", "fidelity", "--quiet"]) == 0
    assert len(calls) == FIDELITY_STEPS and PIL.Image.open(tmp_path / "o.png").size == (48, 40)
    assert main(arguments + ["--mode", "fidelity", "--steps", "2", "--quiet", "--overwrite"]) == 0
    assert len(calls) == FIDELITY_STEPS + 2

    # A model saved with its own fidelity_steps answers in them, also where detail mode starts from its answer.
    SR3Pipeline(pipeline.unet, scheduler, upscale_factor=4, fidelity_steps=3).save_pretrained(tmp_path / "x0")
    calls.clear()
    assert main(arguments + ["--overwrite"]) == 0
    assert len(calls) == 3
    assert capsys.readouterr().out.splitlines()[0] == (
        "fidelity mode: 3 deterministic DDIM steps (3 network evaluations per tile)"
    )
    calls.clear()
    assert main(arguments + ["--mode", "detail", "--steps", "4", "--strength", "0.5", "--overwrite"]) == 0
    assert len(calls) == 3 + 2
    assert "(5 network evaluations per tile)" in capsys.readouterr().out.splitlines()[0]


def test_upscale_self_ensemble_averages_eight_orientations_and_counts_them(model_dir, tmp_path, monkeypatch, capsys):
    from diffusers_sr3 import SR3Pipeline
    from diffusers_sr3.progress import UpscaleProgress

    progresses = []
    progress_init = UpscaleProgress.__init__
    monkeypatch.setattr(
        UpscaleProgress, "__init__", lambda self, *a, **kw: progresses.append(self) or progress_init(self, *a, **kw)
    )
    pipeline = SR3Pipeline.from_pretrained(model_dir)
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample")
    SR3Pipeline(pipeline.unet, scheduler, upscale_factor=4).save_pretrained(tmp_path / "x0")
    source = write_image(tmp_path / "photo.png", (12, 10))
    arguments = ["upscale", str(source), "--model", str(tmp_path / "x0"), "--backend", "torch", "--quiet"]

    def upscale(name, *extra):
        assert main(arguments + ["--output", str(tmp_path / name), *extra]) == 0
        return np.asarray(PIL.Image.open(tmp_path / name)).astype(int)

    single = upscale("single.png", "--mode", "fidelity", "--tile-size", "32")
    ensemble = upscale("ensemble.png", "--mode", "fidelity", "--tile-size", "32", "--self-ensemble")
    assert ensemble.shape == single.shape == (40, 48, 3) and np.abs(ensemble - single).max() > 0
    # The progress total counts the 8 orientations' tiles (a 40x48 output and its 48x40 quarter-turn).
    plain, eight = progresses[-2:]
    assert eight.steps == plain.steps == FIDELITY_STEPS
    assert eight.crops_per_step == 8 * plain.crops_per_step > 8
    assert eight.done == eight.total and plain.done == plain.total
    for bad, message in (
        (["--mode", "detail"], "--self-ensemble averages fidelity answers"),
        (["--save-process", "2"], "does not combine with --self-ensemble"),
    ):
        assert main(arguments + ["--output", str(tmp_path / "bad.png"), "--self-ensemble", *bad]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_upscale_detail_knobs_eta_and_temperature(model_dir, tmp_path, monkeypatch):
    from diffusers_sr3 import SR3Pipeline

    seen = []
    original = SR3Pipeline.__call__
    monkeypatch.setattr(
        SR3Pipeline, "__call__", lambda self, image, **kw: seen.append(kw) or original(self, image, **kw)
    )
    source = write_image(tmp_path / "photo.png", (12, 10))
    base = ["upscale", str(source), "--model", str(model_dir), "--steps", "3", "--scheduler", "ddim", "--quiet"]
    base += ["--mode", "detail", "--backend", "torch"]

    def upscale(name, *extra):
        assert main(base + ["--output", str(tmp_path / name), *extra]) == 0
        return np.asarray(PIL.Image.open(tmp_path / name)).astype(int)

    plain = upscale("plain.png")
    assert seen[-1]["eta"] is None and "temperature" not in seen[-1]  # the pipeline's own defaults (no detail_eta)
    stochastic = upscale("eta.png", "--eta", "1")
    assert seen[-1]["eta"] == 1.0 and not np.array_equal(stochastic, plain)
    cool = upscale("cool.png", "--temperature", "0.5")
    assert seen[-1]["temperature"] == 0.5 and not np.array_equal(cool, plain)
    assert main(base + ["--output", str(tmp_path / "x.png"), "--mode", "fidelity", "--eta", "1"]) == 2
    assert not (tmp_path / "x.png").exists()


def test_upscale_detail_strength_adds_detail_to_the_fidelity_answer(tmp_path, monkeypatch, capsys):
    import diffusers_sr3.tiling as tiling
    from diffusers_sr3.pretrained import DEFAULT_DETAIL_OPTIONS, DEFAULT_STEPS
    from diffusers_sr3.progress import UpscaleProgress

    calls, totals = [], []
    forward, progress_init = tiling.TiledNetwork.forward, UpscaleProgress.__init__
    monkeypatch.setattr(
        tiling.TiledNetwork, "forward", lambda self, *a, **kw: calls.append(1) or forward(self, *a, **kw)
    )
    monkeypatch.setattr(
        UpscaleProgress,
        "__init__",
        lambda self, network, steps, *a, **kw: totals.append(steps) or progress_init(self, network, steps, *a, **kw),
    )
    photo = tmp_path / "photo.png"
    PIL.Image.open(SAMPLES / "celebahq_16_128" / "lr_16" / "00031.png").save(photo)

    def upscale(name, *extra):
        calls.clear()
        arguments = ["upscale", str(photo), "--output", str(tmp_path / name), "--quiet", "--backend", "torch"]
        assert main(arguments + list(extra)) == 0
        return np.asarray(PIL.Image.open(tmp_path / name)).astype(float)

    fidelity = upscale("fidelity.png")
    # The packaged model's guide (autoguidance) runs beside its UNet at every detail step.
    detail = upscale("detail.png", "--mode", "detail", "--strength", "1")
    assert len(calls) == 2 * DEFAULT_STEPS and totals[-1] == 2 * DEFAULT_STEPS
    light = upscale("light.png", "--mode", "detail")  # the packaged model's detail strength
    assert DEFAULT_DETAIL_OPTIONS["strength"] == 0.6
    # Its 10 detail steps: the fidelity answer's FIDELITY_STEPS (unguided), then the last 6 of 10, guided.
    assert len(calls) == FIDELITY_STEPS + 2 * 6 and totals[-1] == FIDELITY_STEPS + 2 * 6
    upscale("unguided.png", "--mode", "detail", "--guidance-scale", "1")
    assert len(calls) == FIDELITY_STEPS + 6 and totals[-1] == FIDELITY_STEPS + 6
    # Between the fidelity answer and a full refinement from noise.
    assert 0 < np.abs(light - fidelity).mean() < np.abs(detail - fidelity).mean()
    for bad in (["--strength", "0"], ["--strength", "1.2"], ["--mode", "fidelity", "--strength", "0.5"]):
        assert main(["upscale", str(photo), "--output", str(tmp_path / "bad.png"), *bad]) == 2
        assert "strength" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_upscale_guidance_options_change_the_result_or_are_refused(guided_pipeline, tmp_path, capsys):
    guided_pipeline.save_pretrained(tmp_path / "guided")
    photo = write_image(tmp_path / "photo.png", (8, 8))

    def upscale(name, *options):
        arguments = ["--model", str(tmp_path / "guided"), "--mode", "detail", "--steps", "2", "--quiet"]
        assert main(["upscale", str(photo), "--output", str(tmp_path / name), *arguments, *options]) == 0
        return np.asarray(PIL.Image.open(tmp_path / name)).astype(int)

    # The guide has its own weights: each setting changes the result (a guide equal to the UNet changed nothing).
    unguided = upscale("unguided.png", "--guidance-scale", "1")
    guided = upscale("guided.png", "--guidance-scale", "3")
    weighed = upscale("weighed.png", "--guidance-scale", "3", "--parallel-guidance-weight", "0.5")
    assert np.abs(guided - unguided).max() > 0 and np.abs(weighed - guided).max() > 0
    # Unguided, a parallel guidance weight would be ignored: refused, given guidance scale 1 or the model's own.
    bad = [
        "upscale",
        str(photo),
        "--output",
        str(tmp_path / "bad.png"),
        "--model",
        str(tmp_path / "guided"),
        "--mode",
        "detail",
    ]
    assert main(bad + ["--guidance-scale", "1", "--parallel-guidance-weight", "0.5"]) == 2
    assert "--parallel-guidance-weight 0.5 weighs guidance, which guidance scale 1 turns off" in capsys.readouterr().err
    guided_pipeline.register_to_config(guidance_scale=1.0)
    guided_pipeline.save_pretrained(tmp_path / "guided")
    assert main(bad + ["--parallel-guidance-weight", "0.5"]) == 2
    assert "guidance scale 1 turns off" in capsys.readouterr().err and not (tmp_path / "bad.png").exists()


def test_detail_options_the_model_cannot_run_are_refused_before_the_settings_line(model_dir, tmp_path, capsys):
    """Window sizes and guidance the loaded model cannot run are refused in the options' words before the settings
    line and the progress bar, as --eta or --strength out of range are (the unguided, noise-predicting model)."""
    photo = write_image(tmp_path / "in.png", (8, 8))
    factor = SR3UNet2DModel.from_pretrained(model_dir / "unet").downsampling_factor
    base = ["upscale", str(photo), "--output", str(tmp_path / "out.png"), "--model", str(model_dir)]
    base += ["--mode", "detail", "--steps", "2"]
    for bad, message in (
        (
            ["--window-size", str(factor + 2)],
            f"--window-size must be 0 (off) or a positive multiple of the UNet's downsampling factor {factor}, "
            f"got {factor + 2}",
        ),
        (["--guidance-scale", "2"], "--guidance-scale 2 needs a guidance_unet"),
        (["--parallel-guidance-weight", "0.5"], "--parallel-guidance-weight 0.5 needs a guidance_unet"),
    ):
        assert main(base + bad) == 2, bad
        out, err = capsys.readouterr()
        assert "detail mode:" not in out and message in err, (bad, out, err)
    assert not (tmp_path / "out.png").exists()
    with pytest.raises(SystemExit):
        build_parser().parse_args(base + ["--window-size", str(-factor)])
    assert f"--window-size: must be at least 0, got {-factor}" in capsys.readouterr().err
    assert main(base + ["--window-size", str(factor)]) == 0
    assert f"window size {factor}" in capsys.readouterr().out

    # A step count the model saved is its own, not --steps: the refusal names it as the pipeline does.
    pipeline = SR3Pipeline.from_pretrained(model_dir)
    too_many = pipeline.scheduler.config.num_train_timesteps + 1
    SR3Pipeline(pipeline.unet, pipeline.scheduler, detail_steps=too_many).save_pretrained(tmp_path / "saved")
    saved = ["upscale", str(photo), "--output", str(tmp_path / "s.png"), "--model", str(tmp_path / "saved")]
    assert main(saved + ["--mode", "detail"]) == 2
    err = capsys.readouterr().err
    assert f"num_inference_steps must lie in [1, {too_many - 1}], got {too_many}" in err and "--steps" not in err


def test_a_device_this_machine_lacks_is_one_line(model_dir, tmp_path, capsys):
    source = write_image(tmp_path / "in.png", (8, 8))
    missing_cuda = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
    for device, message in (
        (missing_cuda, f"--device {missing_cuda}: this machine has"),
        ("toaster", "--device toaster:"),
    ):
        arguments = ["upscale", str(source), "--model", str(model_dir), "--output", str(tmp_path / "out")]
        assert main([*arguments, "--device", device]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert main(["eval", "--hr", str(tmp_path), "--sr", str(tmp_path), "--device", missing_cuda]) == 2
    assert f"--device {missing_cuda}: this machine has" in capsys.readouterr().err


def _arguments(inputs, out, model_dir, *extra):
    return ["upscale", *map(str, inputs), "--model", str(model_dir), "--output", str(out), "--steps", "1", *extra]


def test_upscale_mirrors_subfolders_and_skips_hidden_files_and_its_own_results(model_dir, tmp_path, capsys):
    photos = tmp_path / "t"
    write_image(photos / "2023" / "IMG_0001.png", (8, 8), 1)
    write_image(photos / "2024" / "IMG_0001.png", (8, 8), 2)
    (photos / "2024" / "._IMG_0001.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")
    out = tmp_path / "t_out"
    assert main(_arguments([photos], out, model_dir, "--quiet")) == 0
    assert sorted(path.relative_to(out).as_posix() for path in out.rglob("*")) == [
        "2023",
        "2023/IMG_0001_sr.png",
        "2024",
        "2024/IMG_0001_sr.png",
    ]
    # Two files of one folder that still meet on one name are refused, saying how to resolve it.
    write_image(tmp_path / "same" / "a.png", (8, 8))
    write_image(tmp_path / "same" / "a.jpg", (8, 8))
    assert main(_arguments([tmp_path / "same"], tmp_path / "same_out", model_dir)) == 2
    assert "rename one of them" in capsys.readouterr().err and not (tmp_path / "same_out").exists()
    # Upscaling a folder into itself twice: the first run's results (and strips) are not inputs the second time.
    mixed = tmp_path / "m"
    write_image(mixed / "a.png", (8, 8))
    for _ in range(2):
        assert main(_arguments([mixed], mixed, model_dir, "--overwrite", "--save-process", "1")) == 0
    assert sorted(path.name for path in mixed.iterdir()) == ["a.png", "a_sr.png", "a_sr_process.png"]
    assert "left out 2 file(s)" in capsys.readouterr().err


def test_upscale_output_file_names_in_any_format_pillow_writes(model_dir, tmp_path, capsys):
    source = write_image(tmp_path / "s.png", (8, 8))
    writable = PIL.Image.registered_extensions()
    for extension in (".jfif", ".tga", ".avif"):
        if writable.get(extension) not in PIL.Image.SAVE:
            continue
        destination = tmp_path / f"x{extension}"
        assert main(_arguments([source], destination, model_dir, "--quiet")) == 0
        assert destination.is_file() and PIL.Image.open(destination).size == (32, 32)
    # A file name for several inputs is refused before any work, not made into a folder called result.png.
    write_image(tmp_path / "two" / "a.png", (8, 8))
    write_image(tmp_path / "two" / "b.png", (8, 8))
    assert main(_arguments([tmp_path / "two"], tmp_path / "result.png", model_dir)) == 2
    assert "names one file, but 2 images were given" in capsys.readouterr().err
    assert not (tmp_path / "result.png").exists()


def test_upscale_says_what_the_output_loses(model_dir, tmp_path, capsys):
    PIL.Image.new("RGBA", (8, 8), (200, 10, 10, 0)).save(tmp_path / "logo.png")
    frames = [PIL.Image.new("RGB", (8, 8), (80 * index, 0, 0)) for index in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert main(_arguments([tmp_path / "logo.png"], tmp_path / "logo.jpg", model_dir, "--quiet")) == 0
    assert "logo.png has transparency, which .jpg cannot store" in capsys.readouterr().err
    assert main(_arguments([tmp_path / "anim.gif"], tmp_path / "anim.png", model_dir, "--quiet")) == 0
    assert "anim.gif has 3 frames: only the first is upscaled" in capsys.readouterr().err


def test_upscale_keeps_16_bit_gray_at_16_bits(model_dir, tmp_path, capsys):
    """A dark smooth 16-bit scan was rounded to 8 bits (a few bands); it is upscaled and written at 16 bits."""
    ramp = np.tile(np.linspace(0, 1000, 16).round().astype(np.uint16), (16, 1))  # under 4 levels in 8 bits
    PIL.Image.fromarray(ramp).save(tmp_path / "scan16.png")
    PIL.Image.fromarray(ramp).save(tmp_path / "scan16.tif")
    for name in ("scan16.png", "scan16.tif"):
        destination = tmp_path / name.replace("scan16", "out")
        assert main(_arguments([tmp_path / name], destination, model_dir)) == 0
        written = PIL.Image.open(destination)
        assert written.mode == "I;16" and written.size == (64, 64) and len(np.unique(np.asarray(written))) > 50
        assert "(64x64, 16-bit)" in capsys.readouterr().out
    assert main(_arguments([tmp_path / "scan16.png"], tmp_path / "out.jpg", model_dir, "--quiet")) == 0
    assert PIL.Image.open(tmp_path / "out.jpg").mode == "L"
    assert "scan16.png is 16-bit; .jpg holds 8 bits" in capsys.readouterr().err
    # With a transparent level (tRNS) the alpha is kept: Pillow has no 16-bit gray with alpha, so 8-bit gray + alpha.
    PIL.Image.fromarray(ramp).save(tmp_path / "clear16.png", transparency=1234)
    assert main(_arguments([tmp_path / "clear16.png"], tmp_path / "clear.png", model_dir, "--quiet")) == 0
    assert PIL.Image.open(tmp_path / "clear.png").mode == "LA"
    assert "clear16.png is 16-bit with transparency: written 8-bit" in capsys.readouterr().err


def test_upscale_decodes_each_batch_when_it_runs_after_checking_them_all(model_dir, tmp_path, monkeypatch):
    from diffusers_sr3 import tiling
    from diffusers_sr3.commands import upscale

    for index in range(3):
        write_image(tmp_path / "in" / f"{index}.png", (8, 8), index)
    (tmp_path / "in" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    events = []
    monkeypatch.setattr(upscale, "open_image", lambda *a, **k: events.append("decode") or open_image(*a, **k))
    original = tiling.tiled_super_resolve
    monkeypatch.setattr(tiling, "tiled_super_resolve", lambda *a, **k: events.append("run") or original(*a, **k))
    assert main(_arguments([tmp_path / "in"], tmp_path / "out", model_dir)) == 2  # the broken file, before any work
    assert events == [] and not (tmp_path / "out").exists()
    (tmp_path / "in" / "3.png").unlink()
    assert main(_arguments([tmp_path / "in"], tmp_path / "out", model_dir, "--quiet")) == 0
    assert events == ["decode", "run"] * 3


def test_upscale_checks_options_before_decoding_or_loading(model_dir, tmp_path, capsys, monkeypatch):
    from diffusers_sr3.commands import upscale

    def no_work(*args, **kwargs):
        raise AssertionError("decoded or loaded before the options were checked")

    monkeypatch.setattr(upscale, "inspect_image", no_work)
    monkeypatch.setattr(upscale, "load_pipeline", no_work)
    source = write_image(tmp_path / "a.png", (8, 8))
    assert main(_arguments([source], tmp_path / "out", model_dir, "--mode", "fidelity", "--eta", "1")) == 2
    assert "apply to detail mode" in capsys.readouterr().err
    # --mode auto: the saved scheduler config tells the mode (the tiny model predicts noise: detail).
    assert main(_arguments([source], tmp_path / "out", model_dir, "--self-ensemble")) == 2
    assert "use it with --mode fidelity" in capsys.readouterr().err
    # What needs a model that predicts the clean image is refused in the command line's words, not the pipeline's.
    assert main(_arguments([source], tmp_path / "out", model_dir, "--mode", "fidelity")) == 2
    assert "--mode fidelity needs a model that predicts the clean image" in (err := capsys.readouterr().err)
    assert "predicts 'epsilon': use --mode detail\n" in err
    assert main(_arguments([source], tmp_path / "out", model_dir, "--mode", "detail", "--strength", "0.6")) == 2
    assert "--strength 0.6 needs a model that predicts the clean image" in (err := capsys.readouterr().err)
    assert "predicts 'epsilon': use --strength 1\n" in err


def test_upscale_checks_the_prediction_type_once_loaded_where_the_configs_do_not_tell(model_dir, tmp_path, capsys):
    from diffusers_sr3.commands import upscale

    # A Hub model whose configs cannot be read before loading (offline, not cached) is checked once loaded.
    source = write_image(tmp_path / "a.png", (8, 8))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(upscale._SavedConfigs, "get", lambda self, relative_path: None)
        for options, remedy in ((["--mode", "fidelity"], "--mode detail"), (["--strength", "0.6"], "--strength 1")):
            assert main(_arguments([source], tmp_path / "out", model_dir, *options)) == 2
            assert f"predicts 'epsilon': use {remedy}\n" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_upscale_results_do_not_depend_on_the_batch_size(model_dir, tmp_path):
    for index in range(3):
        write_image(tmp_path / "in" / f"{index}.png", (8, 8), index)
    results = {}
    for batch_size in ("1", "3"):
        out = tmp_path / f"out{batch_size}"
        assert main(_arguments([tmp_path / "in"], out, model_dir, "--batch-size", batch_size, "--seed", "7")) == 0
        results[batch_size] = [np.asarray(PIL.Image.open(out / f"{index}_sr.png")) for index in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(results["1"], results["3"]))
    # Image i of a run draws from seed + i: the same as upscaling it alone with that seed.
    alone = tmp_path / "alone.png"
    assert main(_arguments([tmp_path / "in" / "2.png"], alone, model_dir, "--seed", "9")) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(alone)), results["1"][2])


def test_upscale_converts_colour_profiles_to_srgb(model_dir, tmp_path):
    from test_image_io import swapped_primaries_profile

    colours = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    PIL.Image.fromarray(colours).save(tmp_path / "tagged.png", icc_profile=swapped_primaries_profile())
    open_image(tmp_path / "tagged.png").save(tmp_path / "srgb.png")
    for name in ("tagged", "srgb"):
        assert main(_arguments([tmp_path / f"{name}.png"], tmp_path / f"{name}_sr.png", model_dir)) == 0
    from PIL import ImageCms

    written = PIL.Image.open(tmp_path / "tagged_sr.png")
    profile = ImageCms.ImageCmsProfile(io.BytesIO(written.info["icc_profile"]))
    assert ImageCms.getProfileDescription(profile).strip() == "sRGB built-in"  # the space its values are in
    assert np.array_equal(np.asarray(written), np.asarray(PIL.Image.open(tmp_path / "srgb_sr.png")))


def test_upscale_checks_tile_options_before_decoding_or_loading(model_dir, tmp_path, capsys, monkeypatch):
    from diffusers_sr3 import tiling
    from diffusers_sr3.commands import upscale

    def no_work(*args, **kwargs):
        raise AssertionError("decoded or loaded before the options were checked")

    source = write_image(tmp_path / "a.png", (8, 8))
    # The tiny model's downsampling factor is 4; a 256x256 tile fills the default budget (no pixel-unshuffle).
    refused = [
        (["--tile-overlap", "-5"], "--tile-overlap must be at least 0, got -5"),
        (["--tile-overlap", "100000"], "--tile-overlap 100000 is too large: at most 252 (the largest tile"),
        (["--tile-size", "32", "--tile-overlap", "30"], "--tile-overlap 30 is too large: at most 28 (--tile-size"),
        (["--tile-size", "0"], "--tile-size must be at least 1, got 0"),
        (["--tile-size", "30"], "--tile-size 30 is not a multiple of the model's downsampling factor 4"),
        (["--tile-batch-size", "0"], "--tile-batch-size must be at least 1, got 0"),
        (["--max-tile-pixels", "0"], "--max-tile-pixels must be at least 1, got 0"),
    ]
    with monkeypatch.context() as patched:
        patched.setattr(upscale, "inspect_image", no_work)
        patched.setattr(upscale, "load_pipeline", no_work)
        for options, message in refused:
            assert main(_arguments([source], tmp_path / "out", model_dir, *options)) == 2
            assert message in capsys.readouterr().err
    # A model whose configs cannot be read before loading (a Hub repo, offline and not cached) is checked once
    # loaded, before any refinement.
    monkeypatch.setattr(upscale, "_saved_unet", lambda model: None)
    monkeypatch.setattr(tiling, "tiled_super_resolve", no_work)
    assert main(_arguments([source], tmp_path / "out", model_dir, "--tile-size", "32", "--tile-overlap", "30")) == 2
    assert "--tile-overlap 30 is too large: at most 28" in capsys.readouterr().err


def test_the_self_ensemble_help_gives_the_gains_measured_in_the_readme():
    from diffusers_sr3.cli import build_parser

    commands = next(action for action in build_parser()._actions if action.choices and "upscale" in action.choices)
    options = commands.choices["upscale"]._option_string_actions
    assert "+0.05 to +0.15 dB on photos" in options["--self-ensemble"].help  # README: +0.15, +0.06, +0.05 dB
    assert "runnable now" in options["--threads"].help


def test_float16_on_the_cpu_runs_without_diffusers_will_fail_warning(model_dir, tmp_path):
    import logging

    # Diffusers warns once per network that float16 on the CPU "will fail"; the networks run there.
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)  # Diffusers' own logger does not propagate
    try:
        source = write_image(tmp_path / "in.png", (8, 8))
        arguments = ["upscale", str(source), "--model", str(model_dir), "--output", str(tmp_path / "out.png")]
        assert main(arguments + ["--dtype", "float16", "--device", "cpu", "--backend", "torch", "--steps", "2"]) == 0
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [message for message in warnings if "float16" in message]
    assert PIL.Image.open(tmp_path / "out.png").size == (32, 32)


def test_upscale_help_gives_the_memory_of_the_full_size_images_beside_the_tile_budget(capsys):
    from diffusers_sr3.commands.upscale import BYTES_PER_OUTPUT_PIXEL

    with pytest.raises(SystemExit):
        main(["upscale", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "within the same budget" not in text
    assert f"those cost about {BYTES_PER_OUTPUT_PIXEL} bytes per output pixel whatever the tiles" in text
    assert "(and detail mode's windows)" in text


def _refuse_work(monkeypatch, events):
    from diffusers_sr3 import tiling
    from diffusers_sr3.commands import upscale

    # `run` imports the refinement when it starts: it is recorded where it is defined.
    for module, name in [(upscale, "open_image"), (upscale, "load_pipeline"), (tiling, "tiled_super_resolve")]:
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, _n=name, **k: events.append(_n) or _o(*a, **k))


def test_upscale_refuses_an_image_too_large_for_the_memory_before_any_work(model_dir, tmp_path, capsys, monkeypatch):
    from diffusers_sr3.commands import upscale

    need = upscale.MIN_BYTES_PER_OUTPUT_PIXEL * 32 * 32  # an 8x8 input's 32x32 output
    monkeypatch.setattr(upscale, "available_memory", lambda device: (need - 1, "available"))
    events = []
    _refuse_work(monkeypatch, events)
    write_image(tmp_path / "in" / "a.png", (4, 4))
    big = write_image(tmp_path / "in" / "b.png", (8, 8))
    out = tmp_path / "out"
    # Like an unreadable file, a file too large stops the run before the model loads: no file is half done.
    assert main(_arguments([tmp_path / "in"], out, model_dir)) == 2
    error = capsys.readouterr().err
    assert events == [] and not out.exists()
    assert f"{big}: a 32x32 output needs at least 0.0 GB of memory" in error
    assert "available: try a smaller input;" in error
    assert "--batch-size 1" not in error and "--mode fidelity" not in error
    assert "--no-memory-check starts it anyway" in error and len(error.strip().splitlines()) == 1
    # Enough: it runs; the override starts it whatever the check would say.
    monkeypatch.setattr(upscale, "available_memory", lambda device: (need, "available"))
    assert main(_arguments([tmp_path / "in"], out, model_dir, "--quiet")) == 0
    monkeypatch.setattr(upscale, "available_memory", lambda device: (0, "available"))
    assert main(_arguments([big], tmp_path / "again.png", model_dir, "--quiet", "--no-memory-check")) == 0


def test_upscale_memory_check_counts_the_batch_and_detail_windows(model_dir, tmp_path, capsys, monkeypatch):
    from diffusers_sr3.commands import upscale

    need = upscale.MIN_BYTES_PER_OUTPUT_PIXEL * 32 * 32
    monkeypatch.setattr(upscale, "available_memory", lambda device: (need, "available"))
    for index in range(2):
        write_image(tmp_path / "in" / f"{index}.png", (8, 8), index)
    assert main(_arguments([tmp_path / "in"], tmp_path / "out", model_dir, "--batch-size", "2")) == 2
    error = capsys.readouterr().err
    assert "0.png (+1 of its size, refined together): a 32x32 output" in error and "or --batch-size 1;" in error
    # Windows 8 pixels across fit four times across the 32-pixel output: twice the memory.
    assert main(_arguments([tmp_path / "in" / "0.png"], tmp_path / "out", model_dir, "--window-size", "8")) == 2
    assert "or --window-size 0 (detail mode's windows double it)" in capsys.readouterr().err
    # Under four windows across the image runs whole: no more than without windows.
    assert main(_arguments([tmp_path / "in" / "0.png"], tmp_path / "o.png", model_dir, "--window-size", "16")) == 0
    # A 16-bit scan of the same size is refined in a batch of its own, and counted so.
    scan = PIL.Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    write_image(tmp_path / "mixed" / "0.png", (8, 8))
    scan.save(tmp_path / "mixed" / "1.png")
    assert main(_arguments([tmp_path / "mixed"], tmp_path / "mixed_out", model_dir, "--batch-size", "2")) == 0
    # 16-bit networks hold half-size images (the blending's float32 sums are left out: the estimate stays below).
    per_pixel = upscale.MIN_BYTES_PER_OUTPUT_PIXEL
    assert upscale.full_size_bytes((40, 30), 3, windows=True) == 2 * per_pixel * 40 * 30 * 3
    assert upscale.full_size_bytes((40, 30), dtype=torch.float16) == per_pixel * 40 * 30 // 2


def test_upscale_memory_check_waits_for_the_model_where_its_folder_does_not_tell(model_dir, tmp_path, monkeypatch):
    import json

    from diffusers_sr3.commands import upscale

    # A model saved before its pipeline recorded the upscale factor (its UNet's config has it): known once loaded.
    index_file = model_dir / "model_index.json"
    index = json.loads(index_file.read_text(encoding="utf-8"))
    index["upscale_factor"] = None
    index_file.write_text(json.dumps(index), encoding="utf-8")
    available = upscale.MIN_BYTES_PER_OUTPUT_PIXEL * 32 * 32 - 1
    monkeypatch.setattr(upscale, "available_memory", lambda device: (available, "available"))
    events = []
    _refuse_work(monkeypatch, events)
    source = write_image(tmp_path / "a.png", (8, 8))
    with pytest.raises(upscale.NotEnoughMemoryError, match="a 32x32 output"):
        upscale.run(build_parser().parse_args(_arguments([source], tmp_path / "out", model_dir)))
    assert events == ["load_pipeline"]


def test_available_memory_reads_meminfo_and_cuda_and_skips_what_it_cannot_tell(monkeypatch):
    import io

    from diffusers_sr3.commands import upscale

    meminfo = "MemTotal:       24683772 kB\nMemFree:          1000 kB\nMemAvailable:   23841272 kB\n"
    monkeypatch.setattr(upscale, "open", lambda *a, **k: io.StringIO(meminfo), raising=False)
    assert upscale.available_memory(torch.device("cpu")) == (23841272 * 1024, "available")
    monkeypatch.setattr(upscale, "open", lambda *a, **k: io.StringIO("MemTotal: 1 kB\n"), raising=False)
    assert upscale.available_memory(torch.device("cpu")) is None  # kernels before 3.14 have no MemAvailable

    def unreadable(*args, **kwargs):
        raise FileNotFoundError("/proc/meminfo")  # macOS, Windows

    monkeypatch.setattr(upscale, "open", unreadable, raising=False)
    assert upscale.available_memory(torch.device("cpu")) is None
    assert upscale.available_memory(torch.device("mps")) is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (5 * 2**30, 80 * 2**30))
    assert upscale.available_memory(torch.device("cuda:1")) == (5 * 2**30, "free on cuda:1")


@pytest.mark.parametrize("version", [2, 1])
def test_available_memory_in_a_container_is_what_its_cgroup_limit_leaves(tmp_path, monkeypatch, version):
    from diffusers_sr3.commands import upscale

    (tmp_path / "meminfo").write_text("MemTotal:       24683772 kB\nMemAvailable:   20000000 kB\n", encoding="utf-8")
    monkeypatch.setattr(upscale, "MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(upscale, "CGROUP_ROOT", str(tmp_path / "cgroup"))
    monkeypatch.setattr(upscale, "PROC_SELF_CGROUP", str(tmp_path / "cgroup-of-self"))  # unreadable: the top
    limit, usage, stat = (
        ("memory.max", "memory.current", "memory.stat")
        if version == 2
        else ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat")
    )
    inactive = "inactive_file" if version == 2 else "total_inactive_file"
    (tmp_path / "cgroup" / "memory").mkdir(parents=True)
    (tmp_path / "cgroup" / limit).write_text(f"{16 * 2**30}\n", encoding="utf-8")
    (tmp_path / "cgroup" / usage).write_text(f"{12 * 2**30}\n", encoding="utf-8")
    active = "active_file" if version == 2 else "total_active_file"
    (tmp_path / "cgroup" / stat).write_text(f"anon 1\n{inactive} {2**30}\n{active} {2**30}\nfile 5\n", encoding="utf-8")
    # 16 GB limit, 12 GB used of which 2 GB page cache, active and inactive (the kernel reclaims both before it
    # kills): 6 GB left, not the host's 19 GB.
    assert upscale.available_memory(torch.device("cpu")) == (6 * 2**30, "available in this container")
    (tmp_path / "cgroup" / limit).write_text(
        "max\n" if version == 2 else f"{2**63 - 4096}\n", encoding="utf-8"
    )  # no limit
    assert upscale.available_memory(torch.device("cpu")) == (20000000 * 1024, "available")


def _cgroup_v2(folder, limit, usage, cache=0):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "memory.max").write_text(f"{limit}\n", encoding="utf-8")
    (folder / "memory.current").write_text(f"{usage}\n", encoding="utf-8")
    (folder / "memory.stat").write_text(
        f"anon {usage - cache}\nactive_file {cache}\ninactive_file 0\n", encoding="utf-8"
    )


def test_available_memory_reads_this_processs_own_cgroup_and_its_ancestors_limits(tmp_path, monkeypatch):
    """Without a cgroup namespace (Slurm, `--cgroupns=host`) the limit is on the process's cgroup, deep in the
    hierarchy; a parent's limit binds it too; inside a namespace the path ("/") is the top."""
    from diffusers_sr3.commands import upscale

    (tmp_path / "meminfo").write_text("MemAvailable:   20000000 kB\n", encoding="utf-8")
    monkeypatch.setattr(upscale, "MEMINFO", str(tmp_path / "meminfo"))
    root = tmp_path / "cgroup"
    monkeypatch.setattr(upscale, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(upscale, "PROC_SELF_CGROUP", str(tmp_path / "self"))
    (tmp_path / "self").write_text("0::/slurm/job_7/step_0\n", encoding="utf-8")
    root.mkdir()
    (root / "memory.stat").write_text("anon 1\n", encoding="utf-8")  # the top has no limit files
    job, step = root / "slurm" / "job_7", root / "slurm" / "job_7" / "step_0"
    _cgroup_v2(job, 8 * 2**30, 3 * 2**30, cache=2**30)  # 6 GB left
    _cgroup_v2(step, 10 * 2**30, 3 * 2**30)
    (step / "memory.max").write_text("max\n", encoding="utf-8")
    assert upscale.available_memory(torch.device("cpu")) == (6 * 2**30, "available in this container")
    _cgroup_v2(step, 4 * 2**30, 3 * 2**30, cache=2**29)  # the step's own limit leaves less: 1.5 GB
    assert upscale.available_memory(torch.device("cpu")) == (3 * 2**29, "available in this container")
    (tmp_path / "self").write_text("0::/\n", encoding="utf-8")  # a namespace: the top's files, which have no limit
    assert upscale.available_memory(torch.device("cpu")) == (20000000 * 1024, "available")
    (tmp_path / "self").write_text("0::/elsewhere\n", encoding="utf-8")  # a folder not seen from here: the top
    _cgroup_v2(root, 2 * 2**30, 2**30)
    assert upscale.available_memory(torch.device("cpu")) == (2**30, "available in this container")


def test_available_memory_reads_the_cgroup_v1_memory_controllers_path(tmp_path, monkeypatch):
    from diffusers_sr3.commands import upscale

    (tmp_path / "meminfo").write_text("MemAvailable:   20000000 kB\n", encoding="utf-8")
    monkeypatch.setattr(upscale, "MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(upscale, "CGROUP_ROOT", str(tmp_path / "cgroup"))
    monkeypatch.setattr(upscale, "PROC_SELF_CGROUP", str(tmp_path / "self"))
    (tmp_path / "self").write_text("12:cpu,cpuacct:/other\n4:memory:/docker/abc\n1:name=systemd:/x\n", encoding="utf-8")
    memory = tmp_path / "cgroup" / "memory"
    for folder, limit in ((memory, 2**63 - 4096), (memory / "docker" / "abc", 4 * 2**30)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "memory.limit_in_bytes").write_text(f"{limit}\n", encoding="utf-8")
        (folder / "memory.usage_in_bytes").write_text(f"{3 * 2**30}\n", encoding="utf-8")
        (folder / "memory.stat").write_text(
            f"cache 9\ntotal_active_file {2**30}\ntotal_inactive_file {2**30}\n", encoding="utf-8"
        )
    assert upscale.available_memory(torch.device("cpu")) == (3 * 2**30, "available in this container")


def test_available_memory_on_cuda_counts_what_the_caching_allocator_holds_unused(monkeypatch):
    from diffusers_sr3.commands import upscale

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (5 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 7 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 4 * 2**30)
    assert upscale.available_memory(torch.device("cuda:0")) == (8 * 2**30, "free on cuda:0")


def test_upscale_fidelity_ignores_the_seed_and_detail_lines_name_each_files_seed(tmp_path, capsys):
    # A model trained with noise-conditioning augmentation noises its condition in both modes.
    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config(condition_noise_embedding=True)).eval()
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample=False)
    SR3Pipeline(unet, scheduler, upscale_factor=4, condition_noise_level=0.1).save_pretrained(tmp_path / "model")
    for index in range(2):
        write_image(tmp_path / "in" / f"{index}.png", (8, 8), index)

    def upscale(out, *extra):
        assert main(_arguments([tmp_path / "in"], tmp_path / out, tmp_path / "model", *extra)) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if " -> " in line]
        return [np.asarray(PIL.Image.open(tmp_path / out / f"{index}_sr.png")) for index in range(2)], lines

    fidelity, lines = upscale("f0", "--mode", "fidelity", "--seed", "0")
    assert len(lines) == 2 and not any("seed" in line for line in lines)  # fidelity mode draws from no seed
    assert all(np.array_equal(a, b) for a, b in zip(fidelity, upscale("f1", "--mode", "fidelity", "--seed", "1")[0]))
    detail, lines = upscale("d", "--mode", "detail", "--seed", "7", "--scheduler", "ddim")
    assert [line.split(" -> ")[0] for line in lines] == [str(tmp_path / "in" / f"{i}.png") for i in range(2)]
    assert lines[0].endswith("(32x32) (seed 7)") and lines[1].endswith("(32x32) (seed 8)")
    # The seed a line names reproduces that file alone.
    alone = tmp_path / "alone.png"
    assert (
        main(_arguments([tmp_path / "in" / "1.png"], alone, tmp_path / "model", "--mode", "detail", "--seed", "8")) == 0
    )
    assert np.array_equal(np.asarray(PIL.Image.open(alone)), detail[1])


def test_upscale_seed_help_names_the_files_seed_and_the_batch_sizes_rounding(capsys):
    with pytest.raises(SystemExit):
        main(["upscale", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    assert "(in detail mode, each file's line ends with its seed), and a run of that image alone with that seed" in text
    assert "the batched network can change a pixel by a rounding step: use the same --batch-size" in text
    assert "so results do not depend on --batch-size" not in text


def test_pipeline_refusals_name_only_the_options_given():
    """A refusal of the pipeline's arguments names the command's option where the value came from the command line,
    and the pipeline's own name where the model saved it."""
    import argparse

    from diffusers_sr3.commands.common import in_option_words, options_given

    refusal = ValueError("strength 0.01 of 3 steps runs no step; num_inference_steps must lie in [1, 2]")
    given = argparse.Namespace(strength=0.01, steps=None, eta=None, window_size=None)
    assert str(in_option_words(refusal, options_given(given))) == (
        "--strength 0.01 of 3 steps runs no step; num_inference_steps must lie in [1, 2]"
    )
    assert str(in_option_words(refusal, options_given(argparse.Namespace(strength=None, steps=None)))) == str(refusal)
    assert str(in_option_words(refusal, options_given(argparse.Namespace(strength=None, steps=2)))) == (
        "strength 0.01 of 3 steps runs no step; --steps must lie in [1, 2]"
    )
