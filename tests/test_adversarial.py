"""The adversarial term: the patch discriminator, its two hinge losses, and training that applies and resumes it."""

import argparse
import os

import pytest
import torch
from safetensors.torch import load_file
from test_data import make_image_folder
from test_training import fast_options

from diffusers_sr3 import SR3Pipeline
from diffusers_sr3.training import TrainingConfig, train
from diffusers_sr3.training.adversarial import (
    PatchDiscriminator,
    batch_condition,
    discriminator_loss,
    generator_adversarial_loss,
)
from diffusers_sr3.training.config import add_training_arguments, config_from_args
from diffusers_sr3.training.objective import NoisedBatch


def judged_batch(clean, noise_level, condition=None):
    """A NoisedBatch carrying what the adversarial losses read: the network input's condition, levels, clean images."""
    network_input = torch.randn_like(clean) if condition is None else torch.cat([condition, torch.randn_like(clean)], 1)
    return NoisedBatch(network_input, noise_level, noise_level, clean, clean=clean)


def test_the_discriminator_judges_local_regions():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(6).eval()
    images, condition = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    logits = discriminator(images, condition)
    assert logits.shape == (2, 1, 8, 8)
    # A change in one corner moves the logits of its own region and leaves the far corner's untouched.
    changed = images.clone()
    changed[:, :, -4:, -4:] += 1.0
    moved = discriminator(changed, condition)
    assert torch.equal(moved[..., 0, 0], logits[..., 0, 0])
    assert not torch.allclose(moved[..., -1, -1], logits[..., -1, -1])
    # The condition is judged too: detail must fit the low-resolution input.
    assert not torch.allclose(discriminator(images, condition + 1.0), logits)


def test_the_condition_is_the_network_input_in_front_of_the_image():
    clean, condition = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    assert torch.equal(batch_condition(judged_batch(clean, torch.ones(2), condition), 3), condition)
    assert batch_condition(judged_batch(clean, torch.ones(2)), 3) is None  # unconditional models


def test_a_trained_discriminator_tells_texture_from_its_smoothed_mean():
    # Real images are textured; the estimates are what the regression loss gives for unknown texture: its mean.
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    discriminator = PatchDiscriminator(3, width=16)
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=2e-3, betas=(0.5, 0.99))
    losses = []
    for _ in range(60):
        clean = torch.randn(8, 3, 32, 32, generator=generator)
        batch = judged_batch(clean, torch.ones(8))
        smooth = torch.nn.functional.avg_pool2d(clean, 8, stride=1, padding=4, count_include_pad=False)[..., :32, :32]
        loss = discriminator_loss(discriminator, smooth, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(2.0, abs=0.2)  # hinge loss of an undecided discriminator
    assert sum(losses[-10:]) / 10 < 0.5
    with torch.no_grad():
        assert discriminator(clean).mean() > 0 > discriminator(smooth).mean()


def test_hinge_losses_of_a_fixed_judge():
    class Constant(torch.nn.Module):
        """Says `real_logit` to images whose mean is positive, `fake_logit` otherwise."""

        def forward(self, images, condition=None):
            return torch.where(images.mean(dim=(1, 2, 3), keepdim=True) > 0, 0.5, -3.0).expand(-1, 1, 2, 2)

    real, fake = torch.ones(2, 3, 4, 4), -torch.ones(2, 3, 4, 4)
    batch = judged_batch(real, torch.tensor([1.0, 0.5]))
    # relu(1 - 0.5) + relu(1 + (-3)) = 0.5: fakes judged fake beyond the margin cost the discriminator nothing.
    assert discriminator_loss(Constant(), fake, batch).item() == pytest.approx(0.5)
    # The generator is paid -D(estimate), weighted by alpha_bar = noise_level^2: 3 x 1 and 3 x 0.25.
    assert generator_adversarial_loss(Constant(), fake, batch).tolist() == pytest.approx([3.0, 0.75])
    with pytest.raises(ValueError, match="clean images"):
        discriminator_loss(Constant(), fake, NoisedBatch(real, torch.ones(2), torch.ones(2), real))


def test_the_generator_loss_trains_the_estimate_not_a_frozen_discriminator():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(6, width=8).requires_grad_(False)
    estimate = torch.randn(2, 3, 32, 32, requires_grad=True)
    batch = judged_batch(torch.randn(2, 3, 32, 32), torch.tensor([0.0, 0.9]), condition=torch.randn(2, 3, 32, 32))
    loss = generator_adversarial_loss(discriminator, estimate, batch)
    assert loss[0].item() == 0.0  # pure noise (alpha_bar 0): left to the regression
    loss.sum().backward()
    assert estimate.grad[1].abs().sum() > 0 and estimate.grad[0].abs().sum() == 0
    assert all(parameter.grad is None for parameter in discriminator.parameters())


def test_training_applies_checkpoints_and_exactly_resumes_the_adversarial_term(tmp_path):
    data = make_image_folder(tmp_path / "images", count=4, bad=False)

    def run(name, weight, steps, **extra):
        options = fast_options(tmp_path / name, residual=True, prediction_type="sample", residual_scale=4.0)
        options.update(max_train_steps=steps, checkpointing_steps=2, **extra)
        train(TrainingConfig(train_data_dir=str(data), adversarial_loss_weight=weight, **options))
        return tmp_path / name

    plain, straight = run("plain", 0.0, 4), run("straight", 0.5, 4)
    run("resumed", 0.5, 2)
    resumed = run("resumed", 0.5, 4, resume_from_checkpoint="latest")

    def unet(folder):
        return SR3Pipeline.from_pretrained(str(folder)).unet.state_dict()

    # Same seed and data: only the adversarial term differs.
    assert any(not torch.equal(unet(plain)[name], value) for name, value in unet(straight).items())
    assert "adversarial loss x0.5" in (straight / "README.md").read_text(encoding="utf-8")
    assert "adversarial loss" not in (plain / "README.md").read_text(encoding="utf-8")
    # The discriminator and its optimizer are in the checkpoints, and nowhere in the saved pipeline.
    assert {"model_1.safetensors", "optimizer_1.bin"} <= set(os.listdir(straight / "checkpoint-4"))
    pipeline_files = [name for folder, _, files in os.walk(straight) if "checkpoint-" not in folder for name in files]
    assert "diffusion_pytorch_model.safetensors" in pipeline_files
    assert not any("model_1" in name or "discriminator" in name for name in pipeline_files)
    # Stopped at step 2 and resumed, the run ends exactly where the straight one does: network and discriminator.
    assert all(torch.equal(unet(straight)[name], value) for name, value in unet(resumed).items())
    judges = [load_file(folder / "checkpoint-4" / "model_1.safetensors") for folder in (straight, resumed)]
    assert judges[0].keys() == judges[1].keys() and all(torch.equal(judges[0][k], judges[1][k]) for k in judges[0])
    # A checkpoint resumes only with the objective it was saved with.
    with pytest.raises(ValueError, match="saved with a discriminator"):
        run("resumed", 0.0, 6, resume_from_checkpoint="latest")
    with pytest.raises(ValueError, match="saved without a discriminator"):
        run("plain", 0.5, 6, resume_from_checkpoint="latest")


def test_unconditional_training_uses_an_unconditional_discriminator(tmp_path):
    data = make_image_folder(tmp_path / "images", count=4, bad=False)
    options = fast_options(tmp_path / "out", preset="tiny_uncond", max_train_steps=2)
    train(TrainingConfig(task="uncond", train_data_dir=str(data), adversarial_loss_weight=1.0, **options))
    assert "adversarial loss x1" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")


def test_adversarial_options_are_parsed_and_checked():
    parser = add_training_arguments(argparse.ArgumentParser(), num_validation_images=2)
    argv = ["--adversarial_loss_weight", "0.1", "--discriminator_learning_rate", "5e-5"]
    config = config_from_args(parser.parse_args(argv))
    assert config.adversarial_loss_weight == 0.1 and config.discriminator_learning_rate == 5e-5
    assert TrainingConfig().adversarial_loss_weight == 0.0
    with pytest.raises(ValueError, match="adversarial_loss_weight must not be negative"):
        TrainingConfig(adversarial_loss_weight=-1)
    with pytest.raises(ValueError, match="discriminator_learning_rate must be positive"):
        TrainingConfig(adversarial_loss_weight=1, discriminator_learning_rate=0)
    with pytest.raises(ValueError, match="applies with --adversarial_loss_weight only"):
        TrainingConfig(discriminator_learning_rate=1e-4)
