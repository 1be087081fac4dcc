"""Diffusers' model CPU offload on the pipelines: its hooks move each network to the execution device for its turn.

No accelerator here, so the execution device is named: `enable_model_cpu_offload(device="cpu")` installs the same
accelerate hooks as on a GPU and runs every network through them. (`enable_sequential_cpu_offload` fails inside
accelerate 1.16 with torch 2.14 for Diffusers' own DDPMPipeline too, so it is not tested here.)
"""

import copy

import torch
from test_cascade import run_cascade, small_cascade


def hooked(network):
    """Whether Diffusers' model offload placed its hook on `network` (a cascade's stages: through its override)."""
    from accelerate.hooks import CpuOffload

    return isinstance(getattr(network, "_hf_hook", None), CpuOffload)


def test_a_guided_pipeline_runs_both_networks_through_the_offload_hooks(guided_pipeline):
    low_resolution = torch.rand(1, 3, 8, 8)

    def run(pipeline):
        return pipeline(low_resolution, generator=torch.Generator().manual_seed(0), output_type="pt").images

    expected = run(guided_pipeline)
    offloaded = copy.deepcopy(guided_pipeline)
    offloaded.enable_model_cpu_offload(device="cpu")
    assert hooked(offloaded.unet) and hooked(offloaded.guidance_unet)
    torch.testing.assert_close(run(offloaded), expected, rtol=0, atol=0)


def test_an_unconditional_pipeline_and_a_cascade_run_offloaded():
    def sample(pipeline):
        return pipeline(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images

    generator = copy.deepcopy(small_cascade().base)
    expected = sample(generator)
    generator.enable_model_cpu_offload(device="cpu")
    assert hooked(generator.unet)
    torch.testing.assert_close(sample(generator), expected, rtol=0, atol=0)

    cascade = small_cascade()
    expected = run_cascade(cascade, output_type="pt")
    cascade.enable_model_cpu_offload(device="cpu")
    assert all(hooked(stage.unet) for stage in (cascade.base, cascade.stage_1, cascade.stage_2))
    torch.testing.assert_close(run_cascade(cascade, output_type="pt"), expected, rtol=0, atol=0)
