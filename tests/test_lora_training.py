"""`--lora_rank`: training adapters on a pretrained model; the saved pipeline is fused, the adapter saved beside it;
EMA, checkpoints and exact resume; the refusals."""

import json
import os
import sys

import pytest
import torch
from conftest import tiny_unet_config
from safetensors.torch import load_file
from test_data import make_image_folder
from test_training import SR_SCRIPT, UNCOND_SCRIPT, as_argv, fast_options, run_script
from test_training_resume import assert_same, resume_options, stop_after_first_checkpoint, weights

from diffusers_sr3 import SR3Pipeline, SR3UnconditionalPipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.training import Trainer, TrainingConfig, load_checkpoint_unet, train

pytest.importorskip("peft")

UNET_FILE = os.path.join("unet", "diffusion_pytorch_model.safetensors")


def pretrained(folder, conditional=True):
    """A tiny pipeline saved in `folder`, as a model to fine-tune; its path."""
    torch.manual_seed(0)
    if conditional:
        unet = SR3UNet2DModel(**tiny_unet_config())
        pipeline = SR3Pipeline(unet, make_scheduler("ddpm", n_timestep=100), upscale_factor=4)
    else:
        unet = SR3UNet2DModel(**tiny_unet_config(in_channels=3))
        pipeline = SR3UnconditionalPipeline(unet, make_scheduler("ddpm", n_timestep=100))
    pipeline.save_pretrained(folder)
    return str(folder)


def lora_options(tmp_path, output, **overrides):
    data = str(tmp_path / "images")
    if not os.path.isdir(data):
        make_image_folder(data, count=4, size=(48, 48), bad=False)
    base = str(tmp_path / "base")
    if not os.path.isdir(base):
        pretrained(base)
    options = fast_options(
        output, preset=None, pretrained_model_name_or_path=base, train_data_dir=data, learning_rate=1e-2, lora_rank=4
    )
    options.update(overrides)
    return options


def predict(unet):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 6, 32, 32, generator=generator)
    with torch.no_grad():
        return unet.eval()(sample, torch.tensor([0.3, 0.9])).sample


def test_a_lora_run_saves_a_fused_pipeline_and_the_adapter(tmp_path, monkeypatch):
    output = tmp_path / "out"
    options = lora_options(tmp_path, output, use_ema=True, ema_decay=0.5, lora_alpha=2)
    assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 0

    base = load_file(str(tmp_path / "base" / UNET_FILE))
    saved = load_file(str(output / UNET_FILE))
    assert saved.keys() == base.keys(), "the saved UNet must be a plain one, in the format every loader reads"
    changed = [name for name in base if not torch.equal(base[name], saved[name])]
    assert changed and all(".to_" in name or ".conv." in name or "embedding_proj" in name for name in changed)
    assert not any("noise_level_embedding" in name for name in changed)

    fused = SR3Pipeline.from_pretrained(str(output)).unet
    adapted = SR3UNet2DModel.from_pretrained(str(tmp_path / "base"), subfolder="unet")
    adapted.load_lora_adapter(str(output), weight_name="pytorch_lora_weights.safetensors")
    assert adapted.peft_config["default_0"].lora_alpha == 2 and adapted.peft_config["default_0"].r == 4
    torch.testing.assert_close(predict(fused), predict(adapted), rtol=1e-5, atol=1e-5)

    summary = json.loads((output / "training_summary.json").read_text(encoding="utf-8"))
    assert 0 < summary["trained_parameters"] < sum(value.numel() for value in base.values()) / 2
    card = (output / "README.md").read_text(encoding="utf-8")
    assert "rank 4, alpha 2" in card and "pytorch_lora_weights.safetensors" in card
    assert not [name for name in os.listdir(output) if name.startswith(".sr3-lora-")]


def test_a_lora_run_resumes_exactly(tmp_path):
    base = pretrained(tmp_path / "base")
    lora = dict(preset=None, pretrained_model_name_or_path=base, lora_rank=2, learning_rate=1e-2)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(resume_options(tmp_path, straight, **lora))
    stop_after_first_checkpoint(resume_options(tmp_path, resumed, **lora))
    checkpoint = weights(resumed / "checkpoint-4")
    assert any(".lora_A." in name for name in checkpoint), "the checkpoint holds the adapter"
    ema = weights(resumed / "checkpoint-4", "ema.safetensors")
    assert len(ema) == sum(".lora_" in name for name in checkpoint), "the EMA follows the adapter alone"

    for other in (dict(lora, lora_rank=4), dict(lora, lora_alpha=4), dict(lora, lora_rank=0)):
        with pytest.raises(ValueError, match="--lora_(rank|alpha) .* there, .* here"):
            Trainer(resume_options(tmp_path, resumed, resume_from_checkpoint="latest", **other)).run()
    trainer = Trainer(resume_options(tmp_path, resumed, resume_from_checkpoint="latest", **lora))
    trainer.run()
    assert trainer.summary["steps_this_run"] == 4
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same(weights(straight / "checkpoint-8", name), weights(resumed / "checkpoint-8", name))
    assert_same(weights(straight, UNET_FILE), weights(resumed, UNET_FILE))
    lora_file = "pytorch_lora_weights.safetensors"
    assert_same(weights(straight, lora_file), weights(resumed, lora_file))

    # A checkpoint of a LoRA run loads as a plain UNet (an autoguidance guide): the EMA adapter merged into the
    # frozen weights, as the final save at the same step; or the trained adapter.
    averaged = load_checkpoint_unet(str(straight / "checkpoint-8"))
    assert averaged.state_dict().keys() == weights(straight, UNET_FILE).keys()
    assert_same(averaged.state_dict(), weights(straight, UNET_FILE))
    trained = load_checkpoint_unet(str(straight / "checkpoint-8"), use_ema=False)
    assert not torch.allclose(predict(trained), predict(averaged))


def test_a_run_without_lora_removes_an_earlier_lora_runs_adapter_from_its_output_dir(tmp_path):
    # A LoRA run's folder, then a run without LoRA saved into it (resumed from another run's checkpoint): the adapter
    # left there would be pushed with the new pipeline and load as its adapter.
    output, other = tmp_path / "out", tmp_path / "other"
    train(TrainingConfig(**lora_options(tmp_path, output, max_train_steps=1)))
    assert (output / "pytorch_lora_weights.safetensors").is_file()
    train(TrainingConfig(**lora_options(tmp_path, other, lora_rank=0, max_train_steps=1, checkpointing_steps=1)))
    resumed = lora_options(
        tmp_path, output, lora_rank=0, max_train_steps=2, resume_from_checkpoint=str(other / "checkpoint-1")
    )
    train(TrainingConfig(**resumed))
    assert not (output / "pytorch_lora_weights.safetensors").exists()
    assert "load_lora_adapter" not in (output / "README.md").read_text(encoding="utf-8")


def test_a_lora_run_in_channels_last_layout_saves_the_adapter(tmp_path):
    output = tmp_path / "out"
    train(TrainingConfig(**lora_options(tmp_path, output, channels_last=True, max_train_steps=2)))
    adapter = load_file(str(output / "pytorch_lora_weights.safetensors"))
    assert adapter and all(".lora_" in name for name in adapter)


def test_gradient_checkpointing_trains_every_adapter(tmp_path):
    # The frozen layers before a checkpointed block give it inputs that need no gradient: a reentrant checkpoint would
    # give its adapters none. Two steps: the first one's learning rate is 0 (warm-up).
    output = tmp_path / "out"
    train(TrainingConfig(**lora_options(tmp_path, output, gradient_checkpointing=True, max_train_steps=2)))
    adapter = load_file(str(output / "pytorch_lora_weights.safetensors"))
    untrained = [name for name, value in adapter.items() if ".lora_B." in name and not value.any()]
    assert any(".lora_B." in name for name in adapter) and not untrained, untrained


def test_a_checkpoint_saved_before_lora_existed_is_refused_with_lora_rank(tmp_path):
    base = pretrained(tmp_path / "base")
    output = tmp_path / "out"
    plain = dict(preset=None, pretrained_model_name_or_path=base, learning_rate=1e-2)
    stop_after_first_checkpoint(resume_options(tmp_path, output, **plain))
    state_file = output / "checkpoint-4" / "training_state.json"
    state = json.loads(state_file.read_text(encoding="utf-8"))
    for key in ("lora_rank", "lora_alpha"):  # as written before --lora_rank existed
        del state["objective"][key]
    state_file.write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(ValueError, match="--lora_rank 0 there, 2 here"):
        Trainer(resume_options(tmp_path, output, resume_from_checkpoint="latest", lora_rank=2, **plain)).run()


def test_an_unconditional_model_trains_lora_through_the_same_core(tmp_path, monkeypatch):
    base = pretrained(tmp_path / "base", conditional=False)
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    output = tmp_path / "out"
    options = fast_options(
        output, preset=None, pretrained_model_name_or_path=base, train_data_dir=data, lora_rank=2, max_train_steps=2
    )
    assert run_script(UNCOND_SCRIPT, as_argv(options), monkeypatch) == 0
    assert load_file(str(output / UNET_FILE)).keys() == load_file(os.path.join(base, UNET_FILE)).keys()
    assert (output / "pytorch_lora_weights.safetensors").is_file()
    SR3UnconditionalPipeline.from_pretrained(str(output))


@pytest.mark.parametrize("script, conditional", [(UNCOND_SCRIPT, True), (SR_SCRIPT, False)])
def test_a_model_of_the_other_task_is_refused_naming_its_script(
    tmp_path, monkeypatch, capsys, caplog, script, conditional
):
    base = str(tmp_path / "base")
    if conditional:  # with an autoguidance guide, as the packaged model has, which is no concern of a refused run
        unet = SR3UNet2DModel(**tiny_unet_config())
        scheduler = make_scheduler("ddpm", n_timestep=100)
        SR3Pipeline(unet, scheduler, upscale_factor=4, guidance_unet=unet, guidance_scale=2.0).save_pretrained(base)
    else:
        pretrained(base, conditional=False)
    data = make_image_folder(str(tmp_path / "images"), count=2, bad=False)
    output = tmp_path / "out"
    options = fast_options(output, preset=None, pretrained_model_name_or_path=base, train_data_dir=data, lora_rank=2)
    assert run_script(script, as_argv(options), monkeypatch) == 2
    error = capsys.readouterr().err
    expected = "train_sr3.py (task='sr')" if conditional else "train_uncond.py (task='uncond')"
    assert f"{base} is a" in error and expected in error
    assert not [record for record in caplog.records if "guide" in record.getMessage()]
    assert not output.exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(lora_rank=4), "--lora_rank trains adapters on top of a trained model's weights"),
        (dict(lora_rank=-1, pretrained_model_name_or_path="x"), "lora_rank must not be negative"),
        (dict(lora_alpha=4.0, pretrained_model_name_or_path="x"), "--lora_alpha applies with --lora_rank only"),
        (dict(lora_rank=4, lora_alpha=0.0, pretrained_model_name_or_path="x"), "lora_alpha must be positive"),
    ],
)
def test_options_that_make_no_sense_are_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**fast_options(tmp_path / "out", **options))


def test_without_peft_lora_training_names_the_extra(tmp_path, monkeypatch, capsys):
    output = tmp_path / "out"
    options = lora_options(tmp_path, output)
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 2
    error = capsys.readouterr().err
    assert "--lora_rank" in error and "pip install diffusers-sr3[lora]" in error
    assert not output.exists()
