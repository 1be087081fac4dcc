"""`sr3 sample`: the --output checks before any sampling, --overwrite, atomic writes and bad sizes."""

import io

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_unet_config

from diffusers_sr3 import SR3CascadePipeline, SR3Pipeline, SR3UnconditionalPipeline, SR3UNet2DModel, make_scheduler
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


def test_a_failed_write_leaves_no_partial_file(model_dir, tmp_path, monkeypatch, capsys):
    real_save = PIL.Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        if not isinstance(fp, io.BytesIO):  # files only: a full disk leaves them truncated
            raise OSError("disk full")

    monkeypatch.setattr(PIL.Image.Image, "save", failing_save)
    assert sample(model_dir, tmp_path / "out" / "grid.png") == 2  # the one-line error, no traceback
    # Pillow writes to a stream, so its error names no file: the message names the one being written.
    error = capsys.readouterr().err.splitlines()[-1]
    assert error == f"sr3 sample: error: cannot write {tmp_path / 'out' / 'grid.png'}: disk full"
    assert list((tmp_path / "out").iterdir()) == []


def test_a_grid_another_run_wrote_meanwhile_is_kept_without_overwrite(model_dir, tmp_path, monkeypatch, capsys):
    from diffusers_sr3.commands import sample as sample_command

    output = tmp_path / "grid.png"
    checked = sample_command.check_destinations

    def another_run_writes_after_the_check(writes, overwrite):
        checked(writes, overwrite)
        output.write_bytes(b"the other run's grid")

    monkeypatch.setattr(sample_command, "check_destinations", another_run_writes_after_the_check)
    assert sample(model_dir, output) == 2
    assert f"{output} already exists; pass --overwrite" in capsys.readouterr().err
    assert output.read_bytes() == b"the other run's grid" and sorted(tmp_path.iterdir()) == [output]
    assert sample(model_dir, output, "--overwrite") == 0
    assert PIL.Image.open(output).size == (16, 16)


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

    # Any seed torch takes, up to 2**64 - 1, as long as the last image's seed + i stays within it.
    assert sample(model_dir, tmp_path / "top.png", "--seed", str(2**64 - 1)) == 0
    assert sample(model_dir, tmp_path / "beyond.png", "-n", "2", "--seed", str(2**64 - 1)) == 2
    assert not (tmp_path / "beyond.png").exists()


def test_a_gray_model_samples_a_grid_and_a_process_strip(tmp_path):
    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config(in_channels=1, out_channels=1, sample_size=16))
    SR3UnconditionalPipeline(unet, make_scheduler("ddpm", n_timestep=50)).save_pretrained(tmp_path / "gray")
    output = tmp_path / "grid.png"
    assert sample(tmp_path / "gray", output, "-n", "2", "--save-process", "2") == 0
    grid = np.asarray(PIL.Image.open(output).convert("RGB"))
    assert grid.shape == (16, 32, 3) and np.array_equal(grid[..., 0], grid[..., 2])  # gray, in an RGB grid
    assert PIL.Image.open(tmp_path / "grid_process.png").size == (32, 32)


@pytest.mark.parametrize(
    "option, message",
    [
        (["--save-process", "-1"], "argument --save-process: must be at least 0, got -1"),
        (["--seed", str(2**64)], f"argument --seed: must be from {-(2**63)} to {2**64 - 1}, got {2**64}"),
        (["--steps", "2,0"], "argument --steps: must be at least 1, got 0"),
    ],
)
def test_out_of_range_options_are_named_before_any_work(tmp_path, capsys, option, message):
    with pytest.raises(SystemExit) as stopped:
        sample(tmp_path / "no_model", tmp_path / "g.png", *option)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def _tiny_unet(in_channels, sample_size):
    torch.manual_seed(0)
    config = dict(block_out_channels=8, channel_multipliers=(1, 2), layers_per_block=1, attention_resolutions=())
    config.update(mid_attention=False, norm_groups=4, in_channels=in_channels, sample_size=sample_size)
    return SR3UNet2DModel(**config)


@pytest.fixture(scope="module")
def cascade_dirs(tmp_path_factory):
    """An 8x8 generator then an 8 -> 16 stage, saved as one cascade folder; and the stage alone as a cascade."""
    folder = tmp_path_factory.mktemp("cascades")
    base = SR3UnconditionalPipeline(_tiny_unet(3, 8), make_scheduler("ddim", n_timestep=50))
    stage = SR3Pipeline(_tiny_unet(6, 16), make_scheduler("ddim", n_timestep=50), upscale_factor=2)
    SR3CascadePipeline.from_stages(base, [stage]).save_pretrained(folder / "cascade")
    SR3CascadePipeline.from_stages(None, [stage]).save_pretrained(folder / "no_base")
    return folder / "cascade", folder / "no_base"


def test_a_cascade_with_a_generator_samples_through_its_stages(cascade_dirs, model_dir, tmp_path, capsys):
    cascade, no_base = cascade_dirs
    output = tmp_path / "grid.png"
    arguments = ["sample", "--model", str(cascade), "--output", str(output), "-n", "3", "--batch-size", "2"]
    assert main(arguments + ["--steps", "2,1", "--scheduler", "ddpm"]) == 0
    assert PIL.Image.open(output).size == (32, 32)  # three 16x16 images (the last stage's size), two a row
    first = np.asarray(PIL.Image.open(output))
    assert main(arguments[:-1] + ["1", "--steps", "2,1", "--overwrite", "--scheduler", "ddpm"]) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(output)), first)  # the same images, whatever the batch
    assert main(arguments + ["--steps", "1", "--overwrite"]) == 0  # one count for every stage
    capsys.readouterr()
    for model, options, message in (
        (cascade, ["--steps", "2,1,1"], "--steps gives 3 step counts for the 2 stages of"),
        (cascade, ["--steps", "1,100"], "stage_1: num_inference_steps must lie in [1, 50], got 100"),
        (cascade, ["--size", "8"], "--size and --save-process do not apply to the cascade"),
        (cascade, ["--save-process", "2"], "--size and --save-process do not apply to the cascade"),
        (no_base, [], "is a cascade without a base generator"),
        (model_dir, ["--steps", "2,1"], "--steps takes one step count for"),
    ):
        command = ["sample", "--model", str(model), "--output", str(tmp_path / "refused.png"), *options]
        assert main(command) == 2
        error = capsys.readouterr().err
        assert error.startswith("sr3 sample: error: ") and message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "refused.png").exists()
