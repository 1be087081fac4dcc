"""`sr3 sample`: the --output checks before any sampling, --overwrite, atomic writes and bad sizes."""

import io

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_unet_config

from diffusers_sr3 import SR3UnconditionalPipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uncond")
    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config(in_channels=3, sample_size=16))
    SR3UnconditionalPipeline(unet, make_scheduler("ddpm", n_timestep=50)).save_pretrained(folder)
    return folder


def sample(model, output, *options):
    return main(["sample", "--model", str(model), "--output", str(output), "-n", "1", "--steps", "2", *options])


def test_the_output_is_checked_before_the_model_is_loaded(tmp_path, capsys):
    missing_model = tmp_path / "no_model"  # reaching the model would fail with another message
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("a file")
    expected = {
        tmp_path / "folder": "is a folder",
        tmp_path / "smp" / "a": "needs an image file extension Pillow can write",
        tmp_path / "smp" / "a.xyz": "needs an image file extension Pillow can write",
        tmp_path / "smp" / "a.xbm": "needs an image file extension Pillow can write",  # XBM is black and white only
        tmp_path / "notes.txt" / "a.png": "notes.txt is not a writable folder",
    }
    for output, message in expected.items():
        assert sample(missing_model, output) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"sr3 sample: error: --output {output}") and message in error
    assert not (tmp_path / "smp").exists()


def test_bad_sizes_and_counts_are_refused(tmp_path, capsys):
    for options, message in (
        (["--size", "-8"], "--size must be at least 1, got -8"),
        (["--size", "0"], "--size must be at least 1, got 0"),
        (["--save-process", "-1"], "--save-process takes a positive number"),
        (["-n", "0"], "--num-images and --batch-size must be at least 1"),
    ):
        assert sample(tmp_path / "no_model", tmp_path / "g.png", *options) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_existing_files_are_replaced_only_with_overwrite(model_dir, tmp_path, capsys):
    output = tmp_path / "grid.jpg"
    output.write_bytes(b"an earlier grid")
    assert sample(model_dir, output) == 2
    assert "grid.jpg already exists; pass --overwrite" in capsys.readouterr().err
    assert output.read_bytes() == b"an earlier grid"
    assert sample(model_dir, output, "--overwrite") == 0
    assert PIL.Image.open(output).format == "JPEG" and PIL.Image.open(output).size == (16, 16)
    # The process strip is a destination too.
    process = tmp_path / "new_process.png"
    process.write_bytes(b"an earlier strip")
    assert sample(model_dir, tmp_path / "new.png", "--save-process", "2") == 2
    assert "new_process.png already exists" in capsys.readouterr().err
    assert process.read_bytes() == b"an earlier strip" and not (tmp_path / "new.png").exists()


def test_a_failed_write_leaves_no_partial_file(model_dir, tmp_path, monkeypatch):
    real_save = PIL.Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        if not isinstance(fp, io.BytesIO):  # files only: a full disk leaves them truncated
            raise OSError("disk full")

    monkeypatch.setattr(PIL.Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        sample(model_dir, tmp_path / "out" / "grid.png")
    assert list((tmp_path / "out").iterdir()) == []


def test_an_image_depends_on_the_seed_and_its_place_not_on_the_batch_size(model_dir, tmp_path):
    grids = {}
    for batch_size in ("1", "2", "3"):
        output = tmp_path / f"grid_{batch_size}.png"
        assert sample(model_dir, output, "-n", "3", "--batch-size", batch_size, "--seed", "7") == 0
        grids[batch_size] = np.asarray(PIL.Image.open(output))
    assert grids["1"].shape == (32, 32, 3)  # a 2x2 grid of 16x16 images
    assert np.array_equal(grids["1"], grids["2"]) and np.array_equal(grids["1"], grids["3"])
    # The first image is the pipeline's with a generator seeded with --seed; the others differ from it.
    pipeline = SR3UnconditionalPipeline.from_pretrained(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    first = pipeline(num_inference_steps=2, generator=torch.Generator().manual_seed(7)).images[0]
    assert np.array_equal(grids["1"][:16, :16], np.asarray(first))
    assert not np.array_equal(grids["1"][:16, :16], grids["1"][:16, 16:])
    assert sample(model_dir, tmp_path / "other.png", "-n", "3", "--seed", "8") == 0
    assert not np.array_equal(grids["1"], np.asarray(PIL.Image.open(tmp_path / "other.png")))


def test_a_gray_model_samples_a_grid_and_a_process_strip(tmp_path):
    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config(in_channels=1, out_channels=1, sample_size=16))
    SR3UnconditionalPipeline(unet, make_scheduler("ddpm", n_timestep=50)).save_pretrained(tmp_path / "gray")
    output = tmp_path / "grid.png"
    assert sample(tmp_path / "gray", output, "-n", "2", "--save-process", "2") == 0
    grid = np.asarray(PIL.Image.open(output).convert("RGB"))
    assert grid.shape == (16, 32, 3) and np.array_equal(grid[..., 0], grid[..., 2])  # gray, in an RGB grid
    assert PIL.Image.open(tmp_path / "grid_process.png").size == (32, 32)
