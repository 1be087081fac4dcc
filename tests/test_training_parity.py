"""The training loss against the original SR3 code (fixtures made with the reference implementation)."""

import pytest
import torch
from conftest import FIXTURES

from diffusers_sr3.convert import convert_original_checkpoint
from diffusers_sr3.noise import training_betas
from diffusers_sr3.training.objective import diffusion_loss, noise_batch


@pytest.mark.parametrize("variant", ["sr3", "ddpm"])
def test_l1_loss_matches_the_original(variant):
    io = torch.load(FIXTURES / f"{variant}_tiny_io.pt", weights_only=True)
    pipeline = convert_original_checkpoint(
        FIXTURES / f"{variant}_tiny_I10_E1_gen.pth", FIXTURES / f"{variant}_tiny_config.json"
    )
    unet = pipeline.unet.eval()
    betas = training_betas(pipeline.scheduler)
    if variant == "sr3":
        # The original drew its continuous levels with numpy; they are given, the rest is this package's code.
        batch = noise_batch(
            unet, betas, io["loss_hr"], io["loss_sr"], noise=io["loss_noise"], noise_level=io["loss_sqrt_alpha_cumprod"]
        )
    else:
        # The DDPM variant draws integer timesteps with torch.randint after the same seed.
        torch.manual_seed(io["loss_torch_seed"])
        batch = noise_batch(unet, betas, io["loss_hr"], io["loss_sr"], noise=io["loss_noise"])
        assert torch.equal(batch.network_level, io["loss_t"])
    with torch.no_grad():
        prediction = unet(batch.network_input, batch.network_level).sample
        loss = diffusion_loss(prediction, batch, loss_type="l1")
    torch.testing.assert_close(loss, io["loss_mean"], rtol=0, atol=1e-5)
    # The L2 option is a different number on the same batch (the loss type is really applied).
    assert abs(diffusion_loss(prediction, batch, loss_type="l2").item() - io["loss_mean"].item()) > 1e-3
