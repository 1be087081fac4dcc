"""Probe: a fine-tuned UNet with the full-resolution head of `finetune.py` (beside this file), run through a benchmark
script (see README.md beside this file).

Every `SR3Pipeline` loaded during the run whose folder holds a `head.safetensors` gets that head on its UNet (not on
its guide): the UNet's prediction goes through `FullResolutionHead` before the pipeline sees it.

    python probe.py samplers --model ARM_FOLDER <benchmarks/samplers.py arguments>
"""

import sys
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import head_for  # noqa: E402
from sampler_probe import run_benchmark  # noqa: E402

from diffusers_sr3 import SR3Pipeline  # noqa: E402
from diffusers_sr3.models.unet_sr3 import SR3UNet2DModel, SR3UNet2DOutput  # noqa: E402

plain_forward, plain_from_pretrained = SR3UNet2DModel.forward, SR3Pipeline.from_pretrained.__func__


def forward(self, sample, signal_level=None, condition_noise_level=None, return_dict=True, **kwargs):
    (prediction,) = plain_forward(self, sample, signal_level, condition_noise_level, return_dict=False, **kwargs)
    head = self._modules.get("full_resolution_head")
    if head is not None:
        level = self._per_sample(signal_level, sample.shape[0], sample.device, "signal_level")
        prediction = head(sample, prediction, self.noise_level_embedding(level).to(sample.dtype))
    return SR3UNet2DOutput(sample=prediction) if return_dict else (prediction,)


def from_pretrained(cls, folder, *args, **kwargs):
    pipeline = plain_from_pretrained(cls, folder, *args, **kwargs)
    weights = Path(folder) / "head.safetensors"
    if weights.is_file():
        state = load_file(weights)
        head = head_for(pipeline.unet, state["conv_mid.weight"].shape[0])
        head.load_state_dict(state)
        pipeline.unet.add_module("full_resolution_head", head.to(pipeline.unet.dtype).eval())
    return pipeline


run_benchmark(
    replacements={
        (SR3UNet2DModel, "forward"): forward,
        (SR3Pipeline, "from_pretrained"): classmethod(from_pretrained),
    }
)
