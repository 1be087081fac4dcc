"""Weight variants by name (hyphenated ones too), judged per variant that loads, a folder of variant weights only, and
`from_pipe` from a pipeline without the optional guide."""

import PIL.Image
import pytest
import torch
from conftest import tiny_unet_config
from diffusers import DDPMPipeline
from test_convert_overwrite_and_types import _convert_arguments, _converted_and_another, _first_weight
from test_hub import hub  # noqa: F401  (the loopback Hub fixture)

from diffusers_sr3 import SR3Pipeline, SR3UnconditionalPipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.cli import main
from diffusers_sr3.pipelines.base import files_to_download, pickle_only_folders, weight_file_variant


@pytest.fixture(autouse=True)
def fresh_default_cache(tmp_path, monkeypatch):
    """huggingface_hub's default cache, read at import time: one per test here."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))


@pytest.mark.parametrize(
    "name, expected",
    [
        ("diffusion_pytorch_model.safetensors", (True, None)),
        ("diffusion_pytorch_model.bin", (True, None)),
        ("diffusion_pytorch_model-00001-of-00003.safetensors", (True, None)),
        ("diffusion_pytorch_model.safetensors.index.json", (True, None)),
        ("diffusion_pytorch_model.fp16.safetensors", (True, "fp16")),
        ("diffusion_pytorch_model.fp16-00002-of-00003.safetensors", (True, "fp16")),
        ("diffusion_pytorch_model.non-ema.safetensors", (True, "non-ema")),
        ("diffusion_pytorch_model.non-ema.bin", (True, "non-ema")),
        ("diffusion_pytorch_model.non-ema-00001-of-00003.safetensors", (True, "non-ema")),
        ("diffusion_pytorch_model.safetensors.index.non-ema.json", (True, "non-ema")),
        ("diffusion_pytorch_model.bin.index.fp16.json", (True, "fp16")),
        ("config.json", (False, None)),
        ("diffusion_pytorch_model.safetensors.txt", (False, None)),
    ],
)
def test_weight_file_variant_reads_diffusers_names(name, expected):
    assert weight_file_variant(name) == expected


def test_a_hyphenated_variant_loads_and_is_downloaded(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path)
    tiny_pipeline.save_pretrained(tmp_path, variant="non-ema", max_shard_size="50KB")
    loaded = SR3Pipeline.from_pretrained(tmp_path, variant="non-ema")
    torch.testing.assert_close(loaded.unet.state_dict(), tiny_pipeline.unet.state_dict())
    listed = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    listed += ["unet/diffusion_pytorch_model.non-ema.safetensors"]
    assert files_to_download(listed, "non-ema") == sorted(set(listed) - {"unet/diffusion_pytorch_model.safetensors"})


def test_convert_overwrite_drops_a_hyphenated_variant_of_the_replaced_model(tmp_path):
    folder = tmp_path / "model"
    converted, old = _converted_and_another(folder)
    old.save_pretrained(folder, variant="non-ema")
    assert main(_convert_arguments(folder, "uncond") + ["--overwrite"]) == 0
    assert not list((folder / "unet").glob("*non-ema*"))
    with pytest.raises(ValueError, match="holds no weights of variant 'non-ema'"):
        SR3UnconditionalPipeline.from_pretrained(folder, variant="non-ema")
    assert _first_weight(SR3UnconditionalPipeline.from_pretrained(folder)) == _first_weight(converted)


def test_pickled_weights_are_judged_by_the_variant_that_loads(tiny_pipeline, tmp_path):
    main_bin = tmp_path / "main_bin"
    tiny_pipeline.save_pretrained(main_bin, safe_serialization=False)
    tiny_pipeline.save_pretrained(main_bin, variant="fp16")
    with pytest.raises(ValueError, match=r"^\S+/main_bin/unet holds pickled weights \(.bin\) and no safetensors"):
        SR3Pipeline.from_pretrained(main_bin)
    assert SR3Pipeline.from_pretrained(main_bin, variant="fp16").unet is not None
    fp16_bin = tmp_path / "fp16_bin"
    tiny_pipeline.save_pretrained(fp16_bin)
    tiny_pipeline.save_pretrained(fp16_bin, variant="fp16", safe_serialization=False)
    with pytest.raises(ValueError, match=r"^\S+/fp16_bin/unet holds pickled weights"):
        SR3Pipeline.from_pretrained(fp16_bin, variant="fp16")
    assert SR3Pipeline.from_pretrained(fp16_bin).unet is not None

    files = ["unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.safetensors"]
    assert pickle_only_folders(files) == ["unet"] and pickle_only_folders(files, "fp16") == []
    assert pickle_only_folders(files, "bf16") == ["unet"]  # a variant the folder lacks loads the main weights


def test_a_hub_repo_pickled_in_the_variant_that_loads_is_refused_before_weights(tiny_pipeline, hub, tmp_path):  # noqa: F811
    folder = tmp_path / "main_bin"
    tiny_pipeline.save_pretrained(folder, safe_serialization=False)
    tiny_pipeline.save_pretrained(folder, variant="fp16")
    tiny_pipeline._upload(str(folder), [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()], "a/b")
    with pytest.raises(ValueError, match=r"^a/b/unet holds pickled weights"):
        SR3Pipeline.from_pretrained("a/b")
    assert not list((tmp_path / "hub_cache").rglob("*.safetensors"))


def test_a_folder_of_variant_weights_only_names_the_variant(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "fp16", variant="fp16")
    with pytest.raises(ValueError, match=r"^\S+/fp16/unet holds only variant 'fp16' weights: pass variant='fp16'$"):
        SR3Pipeline.from_pretrained(tmp_path / "fp16")
    # A variant it lacks falls back to the main weights, which it lacks too.
    with pytest.raises(ValueError, match="holds no weights of variant 'bf16'"):
        SR3Pipeline.from_pretrained(tmp_path / "fp16", variant="bf16")
    tiny_pipeline.save_pretrained(tmp_path / "fp16", variant="ema")
    with pytest.raises(ValueError, match=r"holds only variant 'ema' and 'fp16' weights: pass variant='ema' or "):
        SR3Pipeline.from_pretrained(tmp_path / "fp16")
    loaded = SR3Pipeline.from_pretrained(tmp_path / "fp16", variant="fp16")
    torch.testing.assert_close(loaded.unet.state_dict(), tiny_pipeline.unet.state_dict())


def test_a_hub_repo_of_variant_weights_only_names_the_variant(tiny_pipeline, hub, tmp_path):  # noqa: F811
    tiny_pipeline.push_to_hub("a/fp16", variant="fp16")
    with pytest.raises(ValueError, match=r"^a/fp16/unet holds only variant 'fp16' weights: pass variant='fp16'$"):
        SR3Pipeline.from_pretrained("a/fp16")
    assert SR3Pipeline.from_pretrained("a/fp16", variant="fp16").unet is not None


def test_the_commands_take_a_variant(tiny_pipeline, tmp_path, capsys):
    model = tmp_path / "model"
    tiny_pipeline.save_pretrained(model, variant="fp16")
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "lr.png")
    # --threads: without it, a note on the thread count may come first on stderr (when the load lowers it).
    upscale = ["upscale", str(tmp_path / "lr.png"), "--model", str(model), "--steps", "1", "--threads", "1"]
    assert main([*upscale, "--output", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert error.endswith("unet holds only variant 'fp16' weights: pass --variant fp16\n") and error.count("\n") == 1
    assert main([*upscale, "--output", str(tmp_path / "out"), "--variant", "fp16"]) == 0
    assert (tmp_path / "out" / "lr_sr.png").is_file()

    torch.manual_seed(0)
    unconditional = SR3UnconditionalPipeline(
        SR3UNet2DModel(**tiny_unet_config(in_channels=3, upscale_factor=1, sample_size=16)),
        make_scheduler("ddpm", n_timestep=10),
    )
    unconditional.save_pretrained(tmp_path / "uncond", variant="ema")
    sample = ["sample", "--model", str(tmp_path / "uncond"), "-n", "1", "--steps", "1"]
    assert main([*sample, "--output", str(tmp_path / "s.png")]) == 2
    assert "pass --variant ema" in capsys.readouterr().err
    assert main([*sample, "--output", str(tmp_path / "s.png"), "--variant", "ema"]) == 0


@pytest.mark.parametrize("source_class", [SR3UnconditionalPipeline, DDPMPipeline])
def test_from_pipe_without_a_guide(tiny_pipeline, source_class):
    unconditional = SR3UNet2DModel(**tiny_unet_config(in_channels=3, upscale_factor=1, sample_size=16))
    source = source_class(unet=unconditional, scheduler=tiny_pipeline.scheduler)
    pipeline = SR3Pipeline.from_pipe(source, unet=tiny_pipeline.unet)
    assert pipeline.unet is tiny_pipeline.unet and pipeline.guidance_unet is None
    again = SR3Pipeline.from_pipe(pipeline)
    assert again.guidance_unet is None and again.unet is tiny_pipeline.unet
