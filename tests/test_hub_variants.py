"""Loading a variant from the Hub fetches that variant's weights only (main ones where a component has none)."""

import types

import pytest
import torch
from test_hub import hub  # noqa: F401  (the loopback Hub fixture)

from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel
from diffusers_sr3.pipelines.base import files_to_download

CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens there: every connection is refused


def hub_down(monkeypatch):
    """Point huggingface_hub at a port nobody listens on (not offline mode), without its ~20 s of back-off between
    retries."""
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_PORT)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", CLOSED_PORT + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hf_api.api, "endpoint", CLOSED_PORT)
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda seconds: None))


def fetched(server, repo_id):
    """The repo files that were asked for (`component/file`), in order."""
    marker = f"/{repo_id}/resolve/"
    return [request.split(marker, 1)[1].split("/", 1)[1] for request in server.requests if marker in request]


def test_a_variant_is_fetched_alone_with_fallbacks(tiny_pipeline, tiny_unet, hub, tmp_path):  # noqa: F811
    guided = SR3Pipeline(tiny_unet, tiny_pipeline.scheduler, guidance_unet=SR3UNet2DModel.from_config(tiny_unet.config))
    main_weight = guided.unet.conv_in.weight.clone()
    folder = tmp_path / "saved"
    guided.save_pretrained(folder)
    with torch.no_grad():
        guided.unet.conv_in.weight.add_(1.0)
    guided.save_pretrained(folder, variant="fp16")
    for path in (folder / "guidance_unet").glob("*.fp16.*"):  # the guide has main weights only
        path.unlink()
    hub.repos["someone/sr3"] = {
        path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()
    }

    # Fresh caches (huggingface_hub's own is shared across tests): every file loaded is asked for.
    main = SR3Pipeline.from_pretrained("someone/sr3", cache_dir=tmp_path / "main")
    torch.testing.assert_close(main.unet.conv_in.weight, main_weight)
    weights = {name for name in fetched(hub, "someone/sr3") if "diffusion_pytorch_model" in name}
    assert weights == {"unet/diffusion_pytorch_model.safetensors", "guidance_unet/diffusion_pytorch_model.safetensors"}

    hub.requests.clear()
    variant = SR3Pipeline.from_pretrained("someone/sr3", variant="fp16", cache_dir=tmp_path / "fp16")
    torch.testing.assert_close(variant.unet.conv_in.weight, main_weight + 1)
    torch.testing.assert_close(variant.guidance_unet.conv_in.weight, guided.guidance_unet.conv_in.weight)
    weights = {name for name in fetched(hub, "someone/sr3") if "diffusion_pytorch_model" in name}
    assert weights == {
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "guidance_unet/diffusion_pytorch_model.safetensors",
    }
    with pytest.raises(ValueError, match="holds no weights of variant 'bf16'"):
        SR3Pipeline.from_pretrained("someone/sr3", variant="bf16", cache_dir=tmp_path / "bf16")


def test_files_to_download_choose_one_format_and_variant_per_folder():
    files = [
        "model_index.json",
        "pipeline_sr3.py",
        "unet/config.json",
        "unet/unet_sr3.py",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "stage_1/unet/diffusion_pytorch_model.safetensors",
    ]
    configs = ["model_index.json", "unet/config.json"]
    assert files_to_download(files) == sorted(
        configs + ["unet/diffusion_pytorch_model.safetensors", "stage_1/unet/diffusion_pytorch_model.safetensors"]
    )
    assert files_to_download(files, "fp16") == sorted(
        configs + [name for name in files if ".fp16" in name] + ["stage_1/unet/diffusion_pytorch_model.safetensors"]
    )
    assert files_to_download(files, pickles=True) == sorted(configs + ["unet/diffusion_pytorch_model.bin"])


def test_a_cached_repo_loads_when_the_hub_cannot_be_reached(tiny_pipeline, hub, tmp_path, monkeypatch):  # noqa: F811
    tiny_pipeline.save_pretrained(tmp_path / "saved")
    hub.repos["someone/sr3"] = {
        path.relative_to(tmp_path / "saved").as_posix(): path.read_bytes()
        for path in (tmp_path / "saved").rglob("*")
        if path.is_file()
    }
    cached = SR3Pipeline.from_pretrained("someone/sr3", cache_dir=tmp_path / "cache")
    requests_before = len(hub.requests)
    # The Hub goes away (a flaky or air-gapped machine), not offline mode: the listing fails to connect. (Stopping the
    # loopback Hub is not enough: huggingface_hub's kept-alive connection still answers it.)
    hub_down(monkeypatch)
    again = SR3Pipeline.from_pretrained("someone/sr3", cache_dir=tmp_path / "cache")
    assert not [request for request in hub.requests[requests_before:] if "someone/sr3" in request]
    torch.testing.assert_close(again.unet.conv_in.weight, cached.unet.conv_in.weight)


def test_a_killed_saves_leftover_is_not_a_variant_of_the_folder(tiny_pipeline, tmp_path):
    from diffusers_sr3.pipelines.base import STAGING_PREFIX

    tiny_pipeline.save_pretrained(tmp_path)
    leftover = tmp_path / f"{STAGING_PREFIX}killed" / "unet"
    leftover.mkdir(parents=True)
    (leftover / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"half-written")
    with pytest.raises(ValueError, match="holds no weights of variant 'fp16'"):
        SR3Pipeline.from_pretrained(tmp_path, variant="fp16")
