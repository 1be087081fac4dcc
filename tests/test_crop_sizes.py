"""Training on two crop sizes (--small_crop_size): how batches are cut, which ones, and that resumes stay exact."""

import argparse

import pytest
import torch
from test_data import make_image_folder
from test_training import fast_options

from diffusers_sr3 import SR3Pipeline
from diffusers_sr3.data import PairMaker, batch_generator, cut_into_crops, sample_generator
from diffusers_sr3.image_processing import upsample_condition
from diffusers_sr3.training import TrainingConfig, train
from diffusers_sr3.training import trainer as trainer_module
from diffusers_sr3.training.config import add_training_arguments, config_from_args


def test_a_batch_is_cut_into_its_crops_with_their_own_conditions():
    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(index)) * 2 - 1 for index in range(2)]
    maker = PairMaker(32, 4)
    samples = [maker(image, generator=None) for image in images]
    batch = {name: torch.stack([sample[name] for sample in samples]) for name in ("hr", "lr", "condition")}
    batch["skipped"] = torch.tensor([0, 1])
    cut = cut_into_crops(batch, 16, 4)
    assert cut["hr"].shape == (8, 3, 16, 16) and cut["lr"].shape == (8, 3, 4, 4)
    assert cut["condition"].shape == (8, 3, 16, 16)
    # Row by row within each sample: crop 3 of sample 1 is its bottom-right quarter, HR and LR alike.
    assert torch.equal(cut["hr"][4 + 3], batch["hr"][1, :, 16:, 16:])
    assert torch.equal(cut["lr"][4 + 1], batch["lr"][1, :, :4, 4:])
    # The condition is the LR crop's own upsample, not a crop of the whole sample's (which sees across the cut).
    assert torch.equal(cut["condition"][5], upsample_condition(cut["lr"][5:6], (16, 16))[0])
    assert not torch.allclose(cut["condition"][5], batch["condition"][1, :, :16, 16:])
    assert torch.equal(cut["skipped"], batch["skipped"])
    # Unconditional batches have only HR images.
    assert set(cut_into_crops({"hr": batch["hr"]}, 8, None)) == {"hr"}
    with pytest.raises(ValueError, match="do not tile samples of 32"):
        cut_into_crops(batch, 12, 4)
    with pytest.raises(ValueError, match="at the LR's scale"):
        cut_into_crops(batch, 8, 16)


def test_batch_draws_depend_on_seed_epoch_and_index_only_and_differ_from_the_samples():
    def draw(generator):
        return torch.rand(4, generator=generator)

    assert torch.equal(draw(batch_generator(3, 1, 5)), draw(batch_generator(3, 1, 5)))
    assert not torch.equal(draw(batch_generator(3, 1, 5)), draw(batch_generator(3, 1, 6)))
    assert not torch.equal(draw(batch_generator(3, 1, 5)), draw(batch_generator(3, 2, 5)))
    assert not torch.equal(draw(batch_generator(3, 1, 5)), draw(sample_generator(3, 1, 5)))


def test_options_are_parsed_and_checked(tmp_path):
    parser = add_training_arguments(argparse.ArgumentParser(), num_validation_images=2)
    config = config_from_args(parser.parse_args(["--small_crop_size", "64", "--small_crop_fraction", "0.25"]))
    assert (config.small_crop_size, config.small_crop_fraction) == (64, 0.25)
    assert TrainingConfig().small_crop_size is None
    with pytest.raises(ValueError, match="small_crop_size must be positive"):
        TrainingConfig(small_crop_size=0)
    with pytest.raises(ValueError, match=r"small_crop_fraction must lie in \[0, 1\]"):
        TrainingConfig(small_crop_fraction=1.5)
    data = make_image_folder(tmp_path / "images", count=4, bad=False)
    # The tiny preset trains 32-pixel crops, x4, with a UNet that halves twice.
    for size in (32, 24, 8 + 4, 2):
        with pytest.raises(ValueError, match=f"small_crop_size {size} must be smaller than the resolution 32"):
            train(TrainingConfig(train_data_dir=str(data), small_crop_size=size, **fast_options(tmp_path / "out")))


def test_training_cuts_the_drawn_batches_and_resumes_exactly(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "images", count=4, bad=False)
    sizes = []
    noise_batch = trainer_module.noise_batch

    def recording_noise_batch(model, betas, target_images, *args, **kwargs):
        sizes.append(tuple(target_images.shape))
        return noise_batch(model, betas, target_images, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "noise_batch", recording_noise_batch)

    def run(name, steps, **extra):
        options = fast_options(tmp_path / name, max_train_steps=steps, checkpointing_steps=2)
        options.update({"small_crop_size": 16, "small_crop_fraction": 0.5, **extra})
        train(TrainingConfig(train_data_dir=str(data), **options))
        return SR3Pipeline.from_pretrained(str(tmp_path / name)).unet.state_dict()

    straight = run("straight", 6)
    # 4 images in batches of 2: batches 1 and 2 of each epoch. A batch of 2 x 32 cut up is 8 x 16.
    expected = [
        (8, 3, 16, 16) if torch.rand((), generator=batch_generator(0, epoch, index)) < 0.5 else (2, 3, 32, 32)
        for epoch in range(3)
        for index in (1, 2)
    ]
    assert sizes == expected and {(8, 3, 16, 16), (2, 3, 32, 32)} <= set(sizes)
    sizes.clear()
    run("resumed", 2)
    resumed = run("resumed", 6, resume_from_checkpoint="latest")
    assert sizes == expected
    assert all(torch.equal(straight[name], value) for name, value in resumed.items())
    assert "32 px, 0.5 of the batches cut into 16 px" in (tmp_path / "resumed" / "README.md").read_text(
        encoding="utf-8"
    )
    # With no batch cut, the run is the one-size run.
    sizes.clear()
    run("none", 2, small_crop_fraction=0.0)
    assert sizes == [(2, 3, 32, 32)] * 2
