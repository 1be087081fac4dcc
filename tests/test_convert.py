"""Converting original SR3 checkpoints: parity with the original code, and refusal of anything else."""

import json
import os
import pickle

import pytest
import torch
from conftest import FIXTURES

from diffusers_sr3 import SR3Pipeline, SR3UnconditionalPipeline
from diffusers_sr3.cli import main
from diffusers_sr3.convert import CheckpointError, convert_original_checkpoint, load_original_config
from diffusers_sr3.noise import network_inputs_for_schedule

VARIANTS = ("sr3", "ddpm", "uncond")


def convert(variant, **kwargs):
    return convert_original_checkpoint(
        FIXTURES / f"{variant}_tiny_I10_E1_gen.pth", FIXTURES / f"{variant}_tiny_config.json", **kwargs
    )


def recorded(variant):
    return torch.load(FIXTURES / f"{variant}_tiny_io.pt", weights_only=True)


@pytest.fixture(scope="module")
def pipelines():
    converted = {variant: convert(variant) for variant in VARIANTS}
    for pipeline in converted.values():
        pipeline.set_progress_bar_config(disable=True)
    return converted


def test_converted_kinds_and_configs(pipelines):
    assert isinstance(pipelines["sr3"], SR3Pipeline) and pipelines["sr3"].config.upscale_factor == 4
    assert isinstance(pipelines["uncond"], SR3UnconditionalPipeline)
    assert pipelines["ddpm"].unet.config.conditioning_type == "timestep"
    for variant, parameters in (("sr3", 166_971), ("ddpm", 166_971), ("uncond", 166_755)):
        assert sum(p.numel() for p in pipelines[variant].unet.parameters()) == parameters


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_the_original_network(pipelines, variant):
    io = recorded(variant)
    unet = pipelines[variant].unet
    with torch.no_grad():
        if variant == "ddpm":
            outputs = [unet(io["x"], io["t"]).sample]
        else:
            outputs = [unet(io["x"], io["noise_level"]).sample, unet(io["x"], io["noise_level"].view(-1)).sample]
    for output in outputs:
        torch.testing.assert_close(output, io["expected"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_ddpm_step_matches_the_original_posterior(pipelines, variant):
    io = recorded(variant)
    pipeline = pipelines[variant]
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(scheduler.config.num_train_timesteps)
    timestep = torch.tensor(io["post_t"])
    inputs = network_inputs_for_schedule(scheduler, pipeline.unet.config.conditioning_type)
    level = inputs[scheduler.timesteps.cpu() == timestep][0]
    x_t = io["post_x_t"]
    network_input = x_t if variant == "uncond" else torch.cat([io["post_condition"], x_t], dim=1)
    with torch.no_grad():
        eps = pipeline.unet(network_input, level.expand(2)).sample
    torch.testing.assert_close(eps, io["post_eps"], atol=1e-5, rtol=0)
    torch.manual_seed(io["psample_seed"])
    step = scheduler.step(eps, timestep, x_t)
    torch.testing.assert_close(step.pred_original_sample, io["post_x_recon"], atol=1e-5, rtol=0)
    mean = step.prev_sample - io["psample_noise"] * torch.exp(0.5 * torch.as_tensor(io["post_log_variance"]))
    torch.testing.assert_close(mean, io["post_model_mean"], atol=1e-5, rtol=0)
    torch.testing.assert_close(step.prev_sample, io["psample_out"], atol=1e-5, rtol=0)


def test_sr3_sampling_loop_reproduces_the_original(pipelines):
    """Same global seed, no generator: 100 DDPM steps on the recorded condition match the original's result."""
    io = recorded("sr3")
    torch.manual_seed(io["loop_seed"])
    output = pipelines["sr3"](
        (io["loop_condition"] + 1) / 2, output_size=32, num_inference_steps=100, output_type="pt", num_intermediates=10
    )
    expected = io["loop_out_continuous"]
    torch.testing.assert_close(output.images * 2 - 1, expected[-1:], atol=1e-4, rtol=0)
    # The original's sr_process rows 1..10 are the states after steps 99, 88, ..., 0.
    for snapshot, row in zip(output.intermediates, expected[1:]):
        torch.testing.assert_close(snapshot * 2 - 1, row[None].clamp(-1, 1), atol=1e-4, rtol=0)


def test_unconditional_sampling_loop_reproduces_the_original(pipelines):
    io = recorded("uncond")
    torch.manual_seed(io["loop_seed"])
    output = pipelines["uncond"](batch_size=1, num_inference_steps=100, height=32, width=32, output_type="pt")
    torch.testing.assert_close(output.images * 2 - 1, io["loop_out_continuous"][-1:], atol=1e-4, rtol=0)


def test_config_comments_are_allowed(tmp_path):
    config = json.loads((FIXTURES / "sr3_tiny_config.json").read_text(encoding="utf-8"))
    text = json.dumps(config, indent=2).replace('"name": "sr3_tiny",', '"name": "sr3_tiny", // a comment\n')
    text = text.replace('"phase": "train",', '"phase": "train", // "quoted // inside a comment"')
    (tmp_path / "commented.json").write_text("// header comment\n" + text, encoding="utf-8")
    assert load_original_config(tmp_path / "commented.json") == config
    pipeline = convert_original_checkpoint(FIXTURES / "sr3_tiny_I10_E1_gen.pth", tmp_path / "commented.json")
    assert isinstance(pipeline, SR3Pipeline)


def test_converted_folder_reloads_identically(tmp_path, pipelines):
    convert("sr3", output_dir=tmp_path / "converted")
    reloaded = SR3Pipeline.from_pretrained(tmp_path / "converted")
    io = recorded("sr3")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.unet(io["x"], io["noise_level"]).sample, io["expected"], atol=1e-5, rtol=0)
    assert reloaded.scheduler.config.num_train_timesteps == 100


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/sr3-should-not-exist",))


def test_files_that_are_not_original_checkpoints_are_refused(tmp_path):
    sr3_config = FIXTURES / "sr3_tiny_config.json"
    cases = {}
    cases["optimizer-state file"] = FIXTURES / "sr3_tiny_I10_E1_opt.pth"
    state = torch.load(FIXTURES / "sr3_tiny_I10_E1_gen.pth", weights_only=True)
    renamed = {key.replace("denoise_fn.", "net."): value for key, value in state.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    cases["neither 'denoise_fn"] = tmp_path / "renamed.pth"
    with open(tmp_path / "code.pth", "wb") as handle:
        pickle.dump({"denoise_fn.x": _Payload()}, handle)
    cases["is no checkpoint of plain tensors"] = tmp_path / "code.pth"
    torch.save({"denoise_fn.x": _Payload()}, tmp_path / "code_saved.pth")
    cases["holds pickled Python objects, not only tensors, and loading them could run code"] = (
        tmp_path / "code_saved.pth"
    )
    cases["is no checkpoint of plain tensors "] = sr3_config  # torch's own words advise weights_only=False
    (tmp_path / "truncated.pth").write_bytes((FIXTURES / "sr3_tiny_I10_E1_gen.pth").read_bytes()[:5000])
    cases["cannot be loaded as plain tensors "] = tmp_path / "truncated.pth"
    for message, path in cases.items():
        with pytest.raises(CheckpointError, match=message.strip()) as raised:
            convert_original_checkpoint(path, sr3_config)
        assert "weights_only" not in str(raised.value) and "\x1b" not in str(raised.value)
    assert not os.path.exists("/tmp/sr3-should-not-exist")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        convert_original_checkpoint(tmp_path / "missing_gen.pth", sr3_config)


def test_a_config_that_does_not_match_the_weights_is_refused(tmp_path):
    config = json.loads((FIXTURES / "sr3_tiny_config.json").read_text(encoding="utf-8"))
    config["model"]["unet"]["res_blocks"] = 2
    with pytest.raises(CheckpointError, match="config does not match the weights"):
        convert_original_checkpoint(FIXTURES / "sr3_tiny_I10_E1_gen.pth", config)
    config = json.loads((FIXTURES / "sr3_tiny_config.json").read_text(encoding="utf-8"))
    config["model"]["unet"]["norm_groups"] = 8
    # The line names the JSON setting to fix, not only the tensors it changes.
    for setting, value, message in [
        ("inner_channel", 16, "model.unet.inner_channel is 16, the weights' is 8: shapes differ"),
        ("in_channel", 3, "model.unet.in_channel is 3, the weights take 6 channels: shapes differ"),
        ("out_channel", 1, "model.unet.out_channel is 1, the weights give 3 channels: shapes differ"),
        ("channel_multiplier", [1, 2, 2], r"the levels' widths differ \(model.unet.channel_multiplier\): shapes"),
    ]:
        wrong = json.loads(json.dumps(config))
        wrong["model"]["unet"][setting] = value
        with pytest.raises(CheckpointError, match=message):
            convert_original_checkpoint(FIXTURES / "sr3_tiny_I10_E1_gen.pth", wrong)
    with pytest.raises(CheckpointError, match="'ddpm' network but the config says which_model_G 'sr3'"):
        convert_original_checkpoint(FIXTURES / "ddpm_tiny_I10_E1_gen.pth", FIXTURES / "sr3_tiny_config.json")
    (tmp_path / "broken.json").write_text("{ not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="not a valid JSON config"):
        convert_original_checkpoint(FIXTURES / "sr3_tiny_I10_E1_gen.pth", tmp_path / "broken.json")


def test_convert_command(tmp_path, capsys):
    output = tmp_path / "pipeline"
    arguments = ["convert", "--checkpoint", str(FIXTURES / "sr3_tiny_I10_E1_gen.pth")]
    arguments += ["--config", str(FIXTURES / "sr3_tiny_config.json"), "--output", str(output)]
    assert main(arguments) == 0
    assert "SR3Pipeline (166,971 parameters)" in capsys.readouterr().out
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert main(arguments) == 2
    assert "already holds a pipeline" in capsys.readouterr().err
    assert main(arguments + ["--overwrite"]) == 0
    bad = ["convert", "--checkpoint", str(FIXTURES / "sr3_tiny_I10_E1_opt.pth")]
    bad += ["--config", str(FIXTURES / "sr3_tiny_config.json"), "--output", str(tmp_path / "other")]
    assert main(bad) == 2
    assert "optimizer-state file" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_text_files_are_refused_as_checkpoints(tmp_path):
    """The weights-only unpickler fails on arbitrary bytes with errors of many kinds (KeyError, IndexError...)."""
    cases = (("notes.csv", "a,b\n1,2\n", "IndexError"), ("hello.txt", "hello world", "KeyError"), ("empty.pth", "", ""))
    for name, text, reason in cases:
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(CheckpointError, match=f"{name} is not an original SR3 checkpoint: .* \\({reason}"):
            convert_original_checkpoint(tmp_path / name, FIXTURES / "sr3_tiny_config.json")


@pytest.mark.parametrize(
    "setting, value, tensors",
    [
        ("attn_res", [], "unexpected tensors down_levels.2.blocks.0.attention."),
        ("image_size", 64, "unexpected tensors down_levels.2.blocks.0.attention."),
        ("attn_res", [8, 16], "missing tensors down_levels.1.blocks.0.attention."),
    ],
    ids=["no attention", "attention at no level", "more attention"],
)
def test_a_config_with_other_attention_layers_than_the_weights_is_refused(setting, value, tensors):
    config = json.loads((FIXTURES / "sr3_tiny_config.json").read_text(encoding="utf-8"))
    config["model"]["unet" if setting == "attn_res" else "diffusion"][setting] = value
    with pytest.raises(CheckpointError, match="check model.unet.attn_res and model.diffusion.image_size") as error:
        convert_original_checkpoint(FIXTURES / "sr3_tiny_I10_E1_gen.pth", config)
    assert tensors in str(error.value)


def _without_schedule_setting(config, key):
    for schedule in config["model"]["beta_schedule"].values():
        del schedule[key]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: _without_schedule_setting(c, "n_timestep"), "no model.beta_schedule.val.n_timestep"),
        (lambda c: _without_schedule_setting(c, "schedule"), "no model.beta_schedule.val.schedule"),
        (lambda c: c["model"]["beta_schedule"]["val"].update(n_timestep="100"), "val.n_timestep must be a whole"),
        (lambda c: c["model"].pop("beta_schedule"), "no model.beta_schedule"),
        (lambda c: c["model"]["beta_schedule"].update(val=None, train=None), "no model.beta_schedule"),
        (lambda c: c.update(datasets=None), "no datasets l_resolution/r_resolution"),
        (lambda c: c.update(datasets=[]), "datasets must be a JSON object"),
        (lambda c: c["datasets"].update(val="x"), "datasets.val must be a JSON object"),
        (
            lambda c: c["datasets"]["val"].update(l_resolution="eight"),
            "datasets.val.l_resolution and r_resolution must be whole numbers",
        ),
        (  # int() read 8.7 as 8, "16" as 16; -8 gave an upscale factor of -4
            lambda c: c["datasets"]["val"].update(l_resolution=8.7),
            r"l_resolution and r_resolution must be whole numbers above 0, got 8.7 and",
        ),
        (
            lambda c: c["datasets"]["val"].update(r_resolution="16"),
            r"must be whole numbers above 0, got \d+ and \"16\"",
        ),
        (lambda c: c["datasets"]["val"].update(l_resolution=-8), "must be whole numbers above 0, got -8 and"),
        (lambda c: c["datasets"]["val"].update(l_resolution=True), "must be whole numbers above 0, got true and"),
        (lambda c: c.update(model=[]), "model must be a JSON object"),
        (lambda c: c.pop("model"), "no model section"),
        (lambda c: c["model"].update(unet=None), "no model.unet section"),
        (lambda c: c["model"].update(diffusion="x"), "model.diffusion must be a JSON object"),
        (lambda c: c["model"]["unet"].pop("in_channel"), "no model.unet.in_channel"),
        (lambda c: c["model"]["unet"].update(attn_res=16), "model.unet.attn_res must be a list"),
    ],
)
def test_config_gaps_are_named(change, message):
    config = json.loads((FIXTURES / "sr3_tiny_config.json").read_text(encoding="utf-8"))
    change(config)
    with pytest.raises(CheckpointError, match=message):
        convert_original_checkpoint(FIXTURES / "sr3_tiny_I10_E1_gen.pth", config)


def _convert_arguments(
    output, checkpoint=FIXTURES / "sr3_tiny_I10_E1_gen.pth", config=FIXTURES / "sr3_tiny_config.json"
):
    return ["convert", "--checkpoint", str(checkpoint), "--config", str(config), "--output", str(output)]


def test_convert_command_names_a_swapped_config(tmp_path, capsys):
    checkpoint = FIXTURES / "sr3_tiny_I10_E1_gen.pth"
    assert main(_convert_arguments(tmp_path / "out", FIXTURES / "sr3_tiny_config.json", checkpoint)) == 2
    error = capsys.readouterr().err
    assert f"{checkpoint} is not a JSON config but a binary file" in error
    assert error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_convert_command_checks_the_output_before_loading_anything(tmp_path, capsys):
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    missing = tmp_path / "missing_gen.pth"
    cases = {
        str(tmp_path / "afile"): "is a file, not a folder",
        str(tmp_path / "afile" / "sub"): f"cannot be created: {tmp_path / 'afile'} is a file",
        "": "--output is empty",
    }
    for output, message in cases.items():
        assert main(_convert_arguments(output, checkpoint=missing)) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "afile").read_text(encoding="utf-8") == "x"


def _trained_folder(folder):
    """A pipeline folder as training leaves it: its model card, the picture the card shows, the run's summary."""
    assert main(_convert_arguments(folder)) == 0
    (folder / "README.md").write_text(
        "# SR3 x8 trained\n\n![LR | SR3 | HR](validation.png)\n![again](./validation.png)\n![up](../outside.png)\n",
        encoding="utf-8",
    )
    for name in ("validation.png", "training_summary.json", "notes.txt", "../outside.png"):
        (folder / name).write_text("old", encoding="utf-8")
    (folder / "logs").mkdir()
    (folder / "logs" / "events").write_text("old", encoding="utf-8")


def test_convert_overwrite_removes_the_replaced_models_description(tmp_path, capsys):
    folder = tmp_path / "model"
    _trained_folder(folder)
    capsys.readouterr()
    # A failed conversion leaves the folder as it was.
    assert main(_convert_arguments(folder, checkpoint=FIXTURES / "sr3_tiny_I10_E1_opt.pth") + ["--overwrite"]) == 2
    assert all((folder / name).exists() for name in ("README.md", "validation.png", "training_summary.json"))
    assert main(_convert_arguments(folder) + ["--overwrite"]) == 0
    assert "removed README.md, training_summary.json, validation.png" in capsys.readouterr().out
    for name in ("README.md", "validation.png", "training_summary.json"):
        assert not (folder / name).exists()
    # Not the card's own: the user's notes, the training logs, a picture outside the folder.
    for name in ("notes.txt", "logs/events", "../outside.png", "model_index.json"):
        assert (folder / name).exists()
    assert isinstance(SR3Pipeline.from_pretrained(folder), SR3Pipeline)


def test_convert_refuses_a_folder_with_training_checkpoints(tmp_path, capsys):
    folder = tmp_path / "run"
    _trained_folder(folder)
    (folder / "checkpoint-500").mkdir()
    (folder / "checkpoint-500" / "training_state.json").write_text("{}", encoding="utf-8")
    capsys.readouterr()
    before = sorted(path.name for path in folder.iterdir())
    for extra in ([], ["--overwrite"]):
        assert main(_convert_arguments(folder) + extra) == 2
        assert "holds training checkpoints (checkpoint-500)" in capsys.readouterr().err
    assert sorted(path.name for path in folder.iterdir()) == before
    (folder / "model_index.json").unlink()  # a run that has not saved its pipeline yet
    assert main(_convert_arguments(folder)) == 2
    assert (folder / "checkpoint-500" / "training_state.json").exists()
