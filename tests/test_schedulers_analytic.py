"""The noise-level mapping is right for every supported scheduler: an analytic check.

For data distributed N(m, s^2) per pixel, the exact epsilon-predictor at noise level a = sqrt(alpha_bar) is
    eps(x, a) = sqrt(1 - a^2) (x - a m) / (a^2 s^2 + 1 - a^2).
Wrapped as an SR3 UNet, a scheduler that is fed the right level produces samples with mean m and std s up to
its discretisation error. Measured at 50 steps on a cosine schedule (1000 steps), the std errors are about
0.001-0.008 for the high-order solvers, 0.013 for the first-order ODE samplers (DDIM, Euler) and 0.030 for the
ancestral ones (DDPM, Euler ancestral); the tolerances below sit just above. A wrong mapping (the timestep, the
level of a neighbouring step, alpha_bar instead of its root, a scaled condition) misses by far more.
"""

import pytest
import torch

from diffusers_sr3 import SR3Pipeline, SR3UnconditionalPipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.noise import swap_scheduler

MEAN, STD = 0.1, 0.3
STEPS = 50
STD_TOLERANCE = {
    "dpmsolver": 0.01,
    "unipc": 0.01,
    "deis": 0.01,
    "heun": 0.015,
    "ddim": 0.02,
    "euler": 0.02,
    "ddpm": 0.04,
    "euler_ancestral": 0.04,
}
MEAN_TOLERANCE = 0.01  # the sample mean of 24,576 pixels has a standard error of 0.002


class GaussianOracle(SR3UNet2DModel):
    """The exact denoiser for N(mean, STD^2) data; the mean is MEAN, or the condition image when conditional."""

    def forward(self, sample, noise_level, return_dict=True):
        noisy = sample[:, -3:].double()
        mean = sample[:, :3].double() if self.config.in_channels == 6 else MEAN
        level = noise_level.reshape(-1, 1, 1, 1).double()
        eps = (1 - level**2).sqrt() * (noisy - level * mean) / (level**2 * STD**2 + 1 - level**2)
        return (eps.float(),)


def oracle(in_channels):
    return GaussianOracle(
        in_channels=in_channels,
        block_out_channels=4,
        channel_multipliers=(1,),
        attention_resolutions=(),
        norm_groups=2,
        sample_size=32,
    )


@pytest.fixture(scope="module")
def base_scheduler():
    return make_scheduler("ddpm", schedule="cosine", n_timestep=1000)


@pytest.mark.parametrize("name", sorted(STD_TOLERANCE))
def test_unconditional_samples_have_the_data_distribution(name, base_scheduler):
    pipeline = SR3UnconditionalPipeline(oracle(3), swap_scheduler(base_scheduler, name))
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images = pipeline(
        batch_size=8, num_inference_steps=STEPS, generator=generator, height=32, width=32, output_type="pt"
    )
    samples = images.images * 2 - 1
    assert abs(samples.mean().item() - MEAN) < MEAN_TOLERANCE, name
    assert abs(samples.std().item() - STD) < STD_TOLERANCE[name], name


@pytest.mark.parametrize("name", ["euler", "dpmsolver", "ddpm"])
def test_conditional_samples_follow_the_unscaled_condition(name, base_scheduler):
    """The condition sets the per-pixel mean; if a scheduler's input scaling touched it, the mean would drift."""
    pipeline = SR3Pipeline(oracle(6), swap_scheduler(base_scheduler, name), upscale_factor=4)
    pipeline.set_progress_bar_config(disable=True)
    low_resolution = torch.full((3, 8, 8), 0.5 * (0.4 + 1))  # 0.4 on the [-1, 1] scale
    generator = [torch.Generator().manual_seed(i) for i in range(8)]
    images = pipeline([low_resolution] * 8, num_inference_steps=STEPS, generator=generator, output_type="pt")
    samples = images.images * 2 - 1
    assert samples.shape == (8, 3, 32, 32)
    assert abs(samples.mean().item() - 0.4) < MEAN_TOLERANCE, name
    assert abs(samples.std().item() - STD) < STD_TOLERANCE[name], name


def test_sigma_and_integer_paths_are_the_same_ode(base_scheduler):
    """DDIM (integer timesteps) and Euler (sigmas) are the same first-order ODE solver: same noise, same result."""
    results = []
    for name in ("ddim", "euler"):
        scheduler = swap_scheduler(base_scheduler, name, timestep_spacing="leading")
        pipeline = SR3UnconditionalPipeline(oracle(3), scheduler)
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(3)
        results.append(pipeline(batch_size=2, num_inference_steps=20, generator=generator, output_type="pt").images)
    torch.testing.assert_close(results[0], results[1], atol=2e-3, rtol=0)
