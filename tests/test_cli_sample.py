"""`sr3 sample`: the --output checks before any sampling, --overwrite, atomic writes and bad sizes."""

import errno
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
    (tmp_path / "notes.txt").write_text("a file", encoding="utf-8")
    expected = {
        tmp_path / "folder": "is a folder",
        tmp_path / "smp" / "a": "needs an image file extension Pillow can write",
        tmp_path / "smp" / "a.xyz": "needs an image file extension Pillow can write",
        tmp_path / "smp" / "a.xbm": "needs an image file extension Pillow can write",  # XBM is black and white only
        tmp_path / "notes.txt" / "a.png": "notes.txt is a file, not a folder",
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
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PIL.Image.Image, "save", failing_save)
    assert sample(model_dir, tmp_path / "out" / "grid.png") == 2  # the one-line error, no traceback
    # Pillow writes to a stream, so its error names no file: the message names the one being written.
    error = capsys.readouterr().err.splitlines()[-1]
    assert (
        error == f"sr3 sample: error: [Errno 28] cannot write {tmp_path / 'out' / 'grid.png'}: No space left on device"
    )
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
        (cascade, ["--steps", "1,100"], "stage_1: --steps must lie in [1, 50], got 100"),
        (cascade, ["--steps", "100,1"], "base: --steps must lie in [1, 50], got 100"),
        (cascade, ["--steps", "100"], "base: --steps must lie in [1, 50], got 100"),
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


@pytest.fixture(scope="module")
def two_stage_cascade(tmp_path_factory):
    """An 8x8 generator, an 8 -> 16 stage predicting the noise, then a 16 -> 32 one predicting the clean image."""
    folder = tmp_path_factory.mktemp("two_stages") / "cascade"
    base = SR3UnconditionalPipeline(_tiny_unet(3, 8), make_scheduler("ddim", n_timestep=50))
    stage_1 = SR3Pipeline(_tiny_unet(6, 16), make_scheduler("ddim", n_timestep=50), upscale_factor=2)
    scheduler = make_scheduler("ddim", n_timestep=50, prediction_type="sample")
    stage_2 = SR3Pipeline(_tiny_unet(6, 32), scheduler, upscale_factor=2)
    SR3CascadePipeline.from_stages(base, [stage_1, stage_2]).save_pretrained(folder)
    return folder


@pytest.fixture
def stage_calls(monkeypatch):
    """The keyword arguments of every SR stage's call, in order."""
    calls = []
    real_call = SR3Pipeline.__call__

    def spy(self, *args, **kwargs):
        calls.append({key: value for key, value in kwargs.items() if key not in ("generator", "output_type")})
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(SR3Pipeline, "__call__", spy)
    return calls


def test_sr_stage_options_reach_each_stage(two_stage_cascade, tmp_path, stage_calls):
    output = tmp_path / "grid.png"
    options = ["--mode", ",detail", "--eta", "0.5,1", "--temperature", "0.8", "--strength", ",0.5"]
    assert sample(two_stage_cascade, output, "--steps", "2,1,2", "--seed", "3", *options) == 0
    # Empty entries keep stage_1's defaults (a stage's default mode is detail); one --temperature is every stage's.
    assert stage_calls == [
        dict(num_inference_steps=1, eta=0.5, temperature=0.8),
        dict(num_inference_steps=2, mode="detail", eta=1.0, temperature=0.8, strength=0.5),
    ]
    # The same image as the cascade's own call with those arguments, seeded as `sr3 sample` seeds image 0.
    cascade = SR3CascadePipeline.from_pretrained(two_stage_cascade)
    cascade.set_progress_bar_config(disable=True)
    expected = cascade(
        num_inference_steps=[2, 1, 2],
        generator=[torch.Generator().manual_seed(3)],
        mode=[None, "detail"],
        eta=[0.5, 1],
        temperature=0.8,
        strength=[None, 0.5],
    ).images[0]
    assert np.array_equal(np.asarray(PIL.Image.open(output)), np.asarray(expected))


def test_one_value_is_every_sr_stages(two_stage_cascade, tmp_path, stage_calls):
    assert sample(two_stage_cascade, tmp_path / "grid.png", "--steps", "1", "--eta", "0", "--mode", "detail") == 0
    assert stage_calls == [dict(num_inference_steps=1, mode="detail", eta=0.0)] * 2


def test_bad_sr_stage_options_are_refused_before_any_network_runs(two_stage_cascade, tmp_path, capsys):
    evaluations = []
    hook = torch.nn.modules.module.register_module_forward_hook(lambda *_: evaluations.append(1))
    try:
        for options, message in (
            (["--eta", "0.5,0.5,0.5"], "--eta gives 3 values for the 2 super-resolution stages of"),
            # In the command's words, naming its options, not the pipeline's (`use mode='detail'`).
            (["--mode", "fidelity,"], "stage_1: --mode fidelity needs a model that predicts the clean image"),
            (["--mode", "fidelity"], "predicts 'epsilon': use --mode detail"),
            (["--strength", "1,0"], "stage_2: --strength must lie in (0, 1], got 0"),
            (["--eta", ",2"], "stage_2: --eta must lie in [0, 1], got 2"),
            (["--temperature=-1,"], "stage_1: --temperature must be finite and at least 0, got -1"),
            (["--strength", "0.5"], "stage_1: --strength 0.5 needs a model that predicts the clean image"),
            (["--strength", "0.5"], "predicts 'epsilon': use --strength 1"),
            (["--steps", "1", "--strength", "0.5,"], "stage_1: --strength 0.5 needs a model that predicts"),
            (["--steps", "1", "--strength", "1,0.5"], "stage_2: --strength 0.5 of 1 steps runs no step"),
            (["--guidance-scale", "1,2"], "stage_2: --guidance-scale 2 needs a guidance_unet"),
            (["--guidance-scale", "2"], "stage_1: --guidance-scale 2 needs a guidance_unet"),
            (["--eta", ",0.5", "--scheduler", "ddpm"], "stage_2: --eta applies to schedulers that take it (DDIM)"),
            (["--steps", "1,1,100", "--mode", ",fidelity"], "stage_2: --steps must lie in [1, 50], got 100"),
            (["--mode", "detail,fidelity", "--eta", "0.5"], "stage_2: --eta, --temperature, --strength and --guid"),
            (["--mode", ",auto", "--temperature", "0.5"], "and --guidance-scale apply to detail mode"),
        ):
            assert sample(two_stage_cascade, tmp_path / "refused.png", *options) == 2
            error = capsys.readouterr().err
            assert error.startswith("sr3 sample: error: ") and message in error and len(error.splitlines()) == 1
    finally:
        hook.remove()
    assert evaluations == [] and not (tmp_path / "refused.png").exists()


def test_a_stage_refusal_names_the_option_only_where_the_command_line_gave_that_stage_its_value(
    two_stage_cascade, tmp_path, capsys
):
    """An empty --steps entry leaves the generator the cascade's default (100 steps, more than its 50): that value is
    no option's, and keeps the pipeline's name; the SR stages' options never name the generator's."""
    assert sample(two_stage_cascade, tmp_path / "refused.png", "--steps", ",1,1", "--eta", "0.5") == 2
    error = capsys.readouterr().err
    assert error == "sr3 sample: error: base: num_inference_steps must lie in [1, 50], got 100\n"


def test_an_unconditional_models_steps_and_size_are_refused_in_the_options_words_before_sampling(
    model_dir, tmp_path, capsys
):
    evaluations = []
    hook = torch.nn.modules.module.register_module_forward_hook(lambda *_: evaluations.append(1))
    try:
        for options, message in (
            (["--steps", "100"], "--steps must lie in [1, 50], got 100"),  # the scheduler's 50 training steps
            (["--size", "9"], "--size must be a multiple of 4 (the model's downsampling factor), got 9"),
        ):
            assert sample(model_dir, tmp_path / "refused.png", *options) == 2
            assert capsys.readouterr().err == f"sr3 sample: error: {message}\n"
    finally:
        hook.remove()
    assert evaluations == [] and not (tmp_path / "refused.png").exists()


def test_fidelity_stages_take_the_detail_options_values_that_change_nothing(two_stage_cascade, tmp_path, stage_calls):
    """As the pipelines do: one --eta 0 or --temperature 1 for every stage also reaches a stage in fidelity mode.
    Spaces around a --mode entry are ignored, as around the numbers'."""
    options = ["--mode", " detail , auto", "--eta", "0", "--temperature", "1"]
    assert sample(two_stage_cascade, tmp_path / "grid.png", "--steps", "1", *options) == 0
    assert [call["mode"] for call in stage_calls] == ["detail", "fidelity"]


def test_the_one_sr_stage_of_the_tiny_cascade_is_counted_in_the_error(cascade_dirs, tmp_path, capsys):
    assert sample(cascade_dirs[0], tmp_path / "g.png", "--temperature", "1,1") == 2
    error = capsys.readouterr().err
    assert "--temperature gives 2 values for the 1 super-resolution stage of" in error and "give 1," in error


@pytest.mark.parametrize(
    "option, message",
    [
        (["--mode", "sharp"], "argument --mode: invalid choice: 'sharp' (choose from 'auto', 'detail', 'fidelity')"),
        (["--mode", "detail,sharp"], "argument --mode: invalid choice: 'sharp'"),
        (["--eta", "0.5,x"], "argument --eta: invalid float value: '0.5,x'"),
        (["--steps", "2,,x"], "argument --steps: expected a whole number, got 'x'"),
    ],
)
def test_unparseable_sr_stage_options_are_named(tmp_path, capsys, option, message):
    with pytest.raises(SystemExit) as stopped:
        sample(tmp_path / "no_model", tmp_path / "g.png", *option)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_an_empty_steps_entry_keeps_that_stages_default_and_auto_picks_each_stages_mode(
    two_stage_cascade, tmp_path, stage_calls
):
    assert sample(two_stage_cascade, tmp_path / "grid.png", "--steps", "1,,1", "--mode", "auto") == 0
    # stage_1 runs its own detail_steps; auto is detail for the stage predicting the noise, fidelity for the other.
    assert stage_calls == [
        dict(num_inference_steps=None, mode="detail"),
        dict(num_inference_steps=1, mode="fidelity"),
    ]


def test_an_unconditional_model_refuses_the_sr_stage_options(model_dir, tmp_path, capsys):
    assert sample(model_dir, tmp_path / "g.png", "--eta", "0", "--guidance-scale", "1") == 2
    error = capsys.readouterr().err
    assert error == (
        f"sr3 sample: error: --eta, --guidance-scale set a cascade's super-resolution stages: {model_dir} is an "
        "unconditional generator, which has none\n"
    )
    assert not (tmp_path / "g.png").exists()


def test_help_lists_the_sr_stage_options(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--mode", "--eta", "--temperature", "--strength", "--guidance-scale"):
        assert flag in text
    assert "for a cascade's super-resolution stages (not its generator)" in text
    # The packaged model upscales: sample refuses it, so its help does not offer it.
    assert "sr3-photos-x4" not in text
