"""Every random draw of the pipelines follows the generator's device, the way Diffusers pipelines draw.

Only a CPU is available to these tests: the device logic is checked with a spy on the draws and with a stand-in for
a CUDA generator that Diffusers' `randn_tensor` rule would refuse to draw from for the CPU.
"""

import PIL.Image
import pytest
import torch
from conftest import tiny_unet_config
from diffusers.utils import torch_utils

from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.pipelines import base, pipeline_sr3


def augmenting_pipeline(prediction_type="sample"):
    """A tiny x4 pipeline whose UNet takes noise-conditioning augmentation (one more random draw per call)."""
    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config(condition_noise_embedding=True)).eval()
    scheduler = make_scheduler("ddpm", n_timestep=100, prediction_type=prediction_type)
    pipeline = SR3Pipeline(unet, scheduler, upscale_factor=4, condition_noise_level=0.3)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def images(count):
    return [PIL.Image.new("RGB", (8, 8), color) for color in ("red", "green", "blue")[:count]]


@pytest.mark.parametrize("mode", ["detail", "fidelity"])
def test_every_draw_is_made_for_the_execution_device(monkeypatch, mode):
    devices = []

    def spy(shape, generator=None, device=None, dtype=None, layout=None):
        devices.append(device)
        return torch_utils.randn_tensor(shape, generator=generator, device=device, dtype=dtype, layout=layout)

    monkeypatch.setattr(pipeline_sr3, "randn_tensor", spy)
    monkeypatch.setattr(base, "randn_tensor", spy)
    pipeline = augmenting_pipeline()
    generators = [torch.Generator().manual_seed(index) for index in range(2)]
    pipeline(images(2), num_inference_steps=2, generator=generators, mode=mode, output_type="pt")
    # The condition's augmentation noise (in fidelity mode drawn from the caller's generators, unused, then from the
    # fixed seed's), then the starting noise.
    draws = 3 if mode == "fidelity" else 2
    assert devices == [pipeline._execution_device] * draws


def test_generator_lists_make_each_image_independent_of_its_batch_mates():
    pipeline = augmenting_pipeline()
    generators = [torch.Generator().manual_seed(index) for index in range(3)]
    batch = pipeline(images(3), num_inference_steps=2, generator=generators, output_type="pt").images
    for index in range(3):
        alone = pipeline(
            images(3)[index], num_inference_steps=2, generator=torch.Generator().manual_seed(index), output_type="pt"
        ).images
        torch.testing.assert_close(alone[0], batch[index], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        pipeline(images(3), num_inference_steps=2, generator=generators[:2])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        pipeline(images(3), num_inference_steps=2, generator=generators[:2], mode="fidelity")


class CudaGenerator:
    """Stands in for `torch.Generator("cuda")` on a machine without CUDA: only its device is looked at."""

    device = torch.device("cuda")


def test_a_cuda_generator_draws_the_condition_noise_on_cuda(monkeypatch):
    """The issue's case: pipeline and generator on CUDA. Drawn for the CPU, Diffusers refuses (and so did we)."""
    requested = []

    def cuda_randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        # Diffusers' rule (diffusers.utils.torch_utils.randn_tensor): a non-CPU generator draws for its own device.
        device = torch.device(device or "cpu")
        for item in generator if isinstance(generator, list) else [generator]:
            if item is not None and item.device.type not in ("cpu", device.type):
                raise ValueError(f"Cannot generate a {device} tensor from a generator of type {item.device.type}.")
        requested.append(device)
        return torch.zeros(shape, dtype=dtype)  # what CUDA would hold, kept on this machine's CPU

    monkeypatch.setattr(pipeline_sr3, "randn_tensor", cuda_randn_tensor)
    monkeypatch.setattr(SR3Pipeline, "_execution_device", property(lambda self: torch.device("cuda")))
    pipeline = augmenting_pipeline()
    condition = torch.rand(2, 3, 32, 32) * 2 - 1
    for generator in (CudaGenerator(), [CudaGenerator(), CudaGenerator()]):
        augmented, level = pipeline._augment_condition(condition, None, generator)
        assert level == pytest.approx(0.3)
        torch.testing.assert_close(augmented, condition * (1 - 0.3**2) ** 0.5)  # zero noise: only the scaling
    assert requested == [torch.device("cuda")] * 2
