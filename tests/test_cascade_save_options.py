"""A cascade's save options reach its stages (each stage is a pipeline saved by its own `save_pretrained`)."""

import collections

import pytest
import torch
from safetensors import safe_open
from test_cascade import small_cascade

from diffusers_sr3 import SR3CascadePipeline

PIPELINES = ("base", "stage_1", "stage_2")


def main_dtype(path):
    """The dtype of most of the file's weights: the level embeddings stay float32 in every variant, as loading keeps
    them (`_keep_in_fp32_modules`)."""
    with safe_open(str(path), "pt") as weights:
        dtypes = collections.Counter(weights.get_tensor(key).dtype for key in weights.keys())
    return dtypes.most_common(1)[0][0]


@pytest.mark.filterwarnings("ignore:There are modules in SR3UNet2DModel")
def test_cascade_variant_save_keeps_every_stages_main_weights(tmp_path):
    cascade = small_cascade()
    cascade.save_pretrained(tmp_path)
    cascade.to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    for name in PIPELINES:
        unet = tmp_path / name / "unet"
        assert main_dtype(unet / "diffusion_pytorch_model.safetensors") == torch.float32, name
        assert main_dtype(unet / "diffusion_pytorch_model.fp16.safetensors") == torch.float16, name
    assert SR3CascadePipeline.from_pretrained(tmp_path).stage_2.unet.dtype == torch.float32
    half = SR3CascadePipeline.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    assert half.stage_2.unet.dtype == torch.float16


def test_cascade_saves_every_stage_as_pickle_or_in_shards_when_asked(tmp_path):
    cascade = small_cascade()
    cascade.save_pretrained(tmp_path / "bin", safe_serialization=False)
    for name in PIPELINES:
        assert sorted(path.name for path in (tmp_path / "bin" / name / "unet").glob("diffusion_pytorch_model*")) == [
            "diffusion_pytorch_model.bin"
        ], name
    loaded = SR3CascadePipeline.from_pretrained(tmp_path / "bin", use_safetensors=False)
    torch.testing.assert_close(loaded.stage_1.unet.state_dict(), cascade.stage_1.unet.state_dict())

    cascade.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    for name in PIPELINES:
        assert (tmp_path / "shards" / name / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists(), name


def test_a_cascade_of_pickled_weights_names_every_stage_and_one_conversion(tmp_path):
    cascade = small_cascade()
    folder = str(tmp_path / "bin")
    cascade.save_pretrained(folder, safe_serialization=False)
    with pytest.raises(ValueError, match="pickled weights") as raised:
        SR3CascadePipeline.from_pretrained(folder)
    message = str(raised.value)
    assert message.startswith(f"{folder}/base/unet, {folder}/stage_1/unet and {folder}/stage_2/unet hold pickled")
    remedy = message.split("save it once as safetensors with `", 1)[1].split("`", 1)[0]
    assert remedy.startswith("SR3CascadePipeline.from_pretrained(")
    exec(remedy, {"SR3CascadePipeline": SR3CascadePipeline})
    converted = SR3CascadePipeline.from_pretrained(folder)
    torch.testing.assert_close(converted.stage_2.unet.state_dict(), cascade.stage_2.unet.state_dict())
