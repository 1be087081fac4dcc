"""Loading from the Hub's cache: offline, with the Hub down, and what each wrong `--model` is told (the loopback Hub of
tests/hub_server.py; no network leaves the machine)."""

import PIL.Image
import pytest
import torch
from test_hub import hub  # noqa: F401  (the loopback Hub fixture)
from test_hub_variants import fetched, hub_down

from diffusers_sr3 import SR3Pipeline, cli


@pytest.fixture(autouse=True)
def fresh_default_cache(tmp_path, monkeypatch):
    """huggingface_hub's default cache, which `sr3 upscale --model` uses, read at import time: one per test here."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))


def publish(server, repo_id, folder):
    """Put the saved pipeline `folder` on the loopback Hub as `repo_id`."""
    server.repos[repo_id] = {
        path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()
    }


def go_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def with_fp16(tiny_pipeline, hub, tmp_path):  # noqa: F811
    """A repo with main and fp16 weights, loaded once (main weights only, as documented) into the cache."""
    folder = tmp_path / "saved"
    tiny_pipeline.save_pretrained(folder)
    tiny_pipeline.save_pretrained(folder, variant="fp16")
    publish(hub, "someone/cached-sr3", folder)
    loaded = SR3Pipeline.from_pretrained("someone/cached-sr3")
    assert not [name for name in fetched(hub, "someone/cached-sr3") if ".fp16." in name]
    return loaded


def test_a_cached_repo_with_a_variant_loads_offline_and_with_the_hub_down(with_fp16, monkeypatch, tmp_path, capsys):
    go_offline(monkeypatch)
    offline = SR3Pipeline.from_pretrained("someone/cached-sr3")
    torch.testing.assert_close(offline.unet.conv_in.weight, with_fp16.unet.conv_in.weight)
    # The variant was never downloaded: named, with what to do.
    with pytest.raises(FileNotFoundError, match=r"cached without unet/diffusion_pytorch_model\.fp16\.safetensors"):
        SR3Pipeline.from_pretrained("someone/cached-sr3", variant="fp16")

    hub_down(monkeypatch)
    down = SR3Pipeline.from_pretrained("someone/cached-sr3")
    torch.testing.assert_close(down.unet.conv_in.weight, with_fp16.unet.conv_in.weight)
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "lr.png")
    arguments = ["upscale", str(tmp_path / "lr.png"), "--model", "someone/cached-sr3", "--steps", "2"]
    assert cli.main(arguments + ["--output", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "lr_sr.png").exists()


def test_proxies_a_huggingface_hub_without_them_would_refuse_are_named(hub, tiny_pipeline, monkeypatch):  # noqa: F811
    """huggingface_hub 2.x (2.4 here) dropped `proxies` (its transport reads HTTPS_PROXY): passed on, a TypeError.
    Its downloader is replaced by one without the argument, so the test runs whatever version is installed."""
    import huggingface_hub

    real = huggingface_hub.snapshot_download

    def snapshot_download(repo_id, **kwargs):
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    tiny_pipeline.push_to_hub("someone/proxied")
    with pytest.raises(ValueError, match=r"takes no `proxies`: set the HTTPS_PROXY"):
        SR3Pipeline.from_pretrained("someone/proxied", proxies={"https": "http://proxy.example:3128"})
    SR3Pipeline.from_pretrained("someone/proxied")


def test_an_uncached_repo_says_so_in_one_line(hub, monkeypatch, tmp_path, capsys):  # noqa: F811
    hub_down(monkeypatch)
    with pytest.raises(
        FileNotFoundError,
        match=r"someone/elsewhere is not a local folder, and Hub repo someone/"
        r"elsewhere is not cached \(listing it on the Hub failed: ConnectError",
    ):
        SR3Pipeline.from_pretrained("someone/elsewhere")
    go_offline(monkeypatch)
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "lr.png")
    assert cli.main(["upscale", str(tmp_path / "lr.png"), "--model", "someone/elsewhere", "--output", "o"]) == 2
    assert capsys.readouterr().err == (
        "sr3 upscale: error: someone/elsewhere is not a local folder, and Hub repo someone/elsewhere is not cached "
        "(offline)\n"
    )


def test_another_pipelines_repo_is_refused_before_its_weights_are_fetched(hub, tmp_path):  # noqa: F811
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path / "ddpm")
    publish(hub, "google/ddpm-like", tmp_path / "ddpm")
    with pytest.raises(ValueError, match="holds a DDPMPipeline, not a SR3Pipeline"):
        SR3Pipeline.from_pretrained("google/ddpm-like")
    with pytest.raises(ValueError, match="holds a DDPMPipeline, which is not an SR3 pipeline"):
        SR3Pipeline.__mro__[1].from_pretrained("google/ddpm-like")
    assert set(fetched(hub, "google/ddpm-like")) == {"model_index.json"}


def test_a_newer_formats_repo_is_refused_before_its_weights_are_fetched(tiny_pipeline, hub, tmp_path, capsys):  # noqa: F811
    import json

    from diffusers_sr3.disk_format import FORMAT_KEY, FORMAT_VERSION, NewerFormatError

    tiny_pipeline.save_pretrained(tmp_path / "newer")
    index = json.loads((tmp_path / "newer" / "model_index.json").read_text(encoding="utf-8"))
    (tmp_path / "newer" / "model_index.json").write_text(
        json.dumps({**index, FORMAT_KEY: FORMAT_VERSION + 1}), encoding="utf-8"
    )
    publish(hub, "someone/newer-sr3", tmp_path / "newer")
    with pytest.raises(NewerFormatError, match="someone/newer-sr3/model_index.json was saved in .* format 2"):
        SR3Pipeline.from_pretrained("someone/newer-sr3")
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "lr.png")
    arguments = ["upscale", str(tmp_path / "lr.png"), "--model", "someone/newer-sr3", "--output", str(tmp_path / "o")]
    assert cli.main(arguments) == 2
    assert "pip install -U diffusers-sr3" in capsys.readouterr().err
    assert not [name for name in fetched(hub, "someone/newer-sr3") if name.endswith(".safetensors")]


def test_a_file_or_a_mistyped_folder_given_as_model_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fx").mkdir()
    (tmp_path / "fx" / "model_gen.pth").write_bytes(b"pickle")
    for model in ("fx/model_gen.pth", str(tmp_path / "fx" / "model_gen.pth")):
        with pytest.raises(NotADirectoryError, match=r"model_gen\.pth is a file, not a pipeline folder .*sr3 convert"):
            SR3Pipeline.from_pretrained(model)
    with pytest.raises(
        FileNotFoundError,
        match=r"^fx/nonexist is not a local folder, and Hub repo fx/nonexist is not "
        r"cached \(offline\)$",
    ):
        SR3Pipeline.from_pretrained("fx/nonexist")
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "lr.png")
    assert cli.main(["upscale", "lr.png", "--model", "fx/model_gen.pth", "--output", "o"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sr3 upscale: error: fx/model_gen.pth is a file") and error.count("\n") == 1


def test_a_folder_of_pickled_weights_says_how_to_convert_it(tiny_pipeline, tmp_path):
    folder = tmp_path / "binpipe"
    tiny_pipeline.save_pretrained(folder, safe_serialization=False)
    with pytest.raises(ValueError, match=r"holds pickled weights") as raised:
        SR3Pipeline.from_pretrained(folder)
    # The remedy it names, as it names it.
    remedy = str(raised.value).split("save it once as safetensors with `", 1)[1].split("`", 1)[0]
    exec(remedy, {"SR3Pipeline": SR3Pipeline})
    converted = SR3Pipeline.from_pretrained(folder)
    torch.testing.assert_close(converted.unet.conv_in.weight, tiny_pipeline.unet.conv_in.weight)


def test_pickled_weights_the_load_does_not_read_are_no_error(tiny_pipeline, hub, tmp_path):  # noqa: F811
    """Only the folders a load reads count: not a component passed in, nor a folder beside the components."""
    folder = tmp_path / "binpipe"
    tiny_pipeline.save_pretrained(folder, safe_serialization=False)
    assert SR3Pipeline.from_pretrained(folder, unet=tiny_pipeline.unet).unet is tiny_pipeline.unet
    tiny_pipeline.push_to_hub("someone/binsr3", safe_serialization=False)
    assert SR3Pipeline.from_pretrained("someone/binsr3", unet=tiny_pipeline.unet).unet is tiny_pipeline.unet
    kept = tmp_path / "kept"
    tiny_pipeline.save_pretrained(kept)
    (folder / "unet").rename(kept / "unet_backup")  # a copy of an old network, in .bin
    torch.testing.assert_close(SR3Pipeline.from_pretrained(kept).unet.state_dict(), tiny_pipeline.unet.state_dict())


def test_a_hub_repo_of_pickled_weights_is_saved_into_a_folder_of_the_users(tiny_pipeline, hub, tmp_path):  # noqa: F811
    """Saved under the repo id, the converted copy would be a local folder that shadows the repo in later loads."""
    tiny_pipeline.push_to_hub("someone/binsr3", safe_serialization=False)
    # Never loaded before: the repo's listing tells, before any weights are fetched (there would be none to fetch).
    with pytest.raises(ValueError, match=r"^someone/binsr3/unet holds pickled weights"):
        SR3Pipeline.from_pretrained("someone/binsr3")
    cached = [path.name for path in (tmp_path / "hub_cache").rglob("*") if path.is_file()]
    assert "model_index.json" in cached and not [name for name in cached if name.endswith(".bin")]
    SR3Pipeline.from_pretrained("someone/binsr3", use_safetensors=False)
    with pytest.raises(ValueError, match=r"holds pickled weights") as raised:
        SR3Pipeline.from_pretrained("someone/binsr3")
    remedy = str(raised.value).split("save it once as safetensors with `", 1)[1].split("`", 1)[0]
    assert remedy == (
        "SR3Pipeline.from_pretrained('someone/binsr3', use_safetensors=False).save_pretrained('a-folder-of-yours')"
    )


@pytest.mark.parametrize("recorded_in", ["unet/config.json", "stage_1/model_index.json", "stage_1/unet/config.json"])
def test_a_repo_whose_component_is_in_a_newer_format_is_refused_before_its_weights_are_fetched(
    tiny_pipeline,
    hub,  # noqa: F811
    tmp_path,
    recorded_in,
):
    import json

    from diffusers_sr3 import SR3BasePipeline, SR3CascadePipeline
    from diffusers_sr3.disk_format import FORMAT_KEY, FORMAT_VERSION, NewerFormatError

    cascade = recorded_in.startswith("stage_1")
    saved = SR3CascadePipeline.from_stages(None, [tiny_pipeline]) if cascade else tiny_pipeline
    saved.save_pretrained(tmp_path / "newer")
    config = json.loads((tmp_path / "newer" / recorded_in).read_text(encoding="utf-8"))
    (tmp_path / "newer" / recorded_in).write_text(
        json.dumps({**config, FORMAT_KEY: FORMAT_VERSION + 1}), encoding="utf-8"
    )
    publish(hub, "someone/newer-part", tmp_path / "newer")
    with pytest.raises(NewerFormatError, match=f"^someone/newer-part/{recorded_in} was saved in .* format 2"):
        SR3BasePipeline.from_pretrained("someone/newer-part")
    assert not [name for name in fetched(hub, "someone/newer-part") if name.endswith(".safetensors")]


def test_a_unet_repo_in_a_newer_format_is_refused_before_its_weights_are_fetched(tiny_unet, hub, tmp_path):  # noqa: F811
    import json

    from diffusers_sr3 import SR3UNet2DModel
    from diffusers_sr3.disk_format import FORMAT_KEY, FORMAT_VERSION, NewerFormatError

    tiny_unet.save_pretrained(tmp_path / "newer")
    config = json.loads((tmp_path / "newer" / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "newer" / "config.json").write_text(
        json.dumps({**config, FORMAT_KEY: FORMAT_VERSION + 1}), encoding="utf-8"
    )
    publish(hub, "someone/newer-unet", tmp_path / "newer")
    with pytest.raises(NewerFormatError, match="^someone/newer-unet: the SR3UNet2DModel config was saved in .* 2"):
        SR3UNet2DModel.from_pretrained("someone/newer-unet")
    assert not [name for name in fetched(hub, "someone/newer-unet") if name.endswith(".safetensors")]


def test_a_whole_pipeline_loaded_as_a_model_is_refused_naming_the_subfolder(
    guided_pipeline,
    hub,  # noqa: F811
    tmp_path,
):
    """Diffusers says only that the repo has no config.json; no weights are fetched before the refusal."""
    from test_hub_variants import fetched

    from diffusers_sr3 import SR3UNet2DModel

    guided_pipeline.push_to_hub("someone/sr3-repo")
    with pytest.raises(FileNotFoundError, match=r"holds a whole pipeline \(SR3Pipeline") as refused:
        SR3UNet2DModel.from_pretrained("someone/sr3-repo")
    for name in ("unet", "guidance_unet"):
        assert f"SR3UNet2DModel.from_pretrained('someone/sr3-repo', subfolder='{name}')" in str(refused.value)
    assert not [name for name in fetched(hub, "someone/sr3-repo") if name.endswith(".safetensors")]
    folder = tmp_path / "saved"
    guided_pipeline.save_pretrained(folder)
    with pytest.raises(FileNotFoundError, match=r"whole pipeline .*subfolder='unet'"):
        SR3UNet2DModel.from_pretrained(folder)
    # As asked: loads.
    SR3UNet2DModel.from_pretrained("someone/sr3-repo", subfolder="unet")


def test_a_cascade_loaded_as_a_model_is_refused_naming_each_stages_unet(
    hub,  # noqa: F811
    tmp_path,
):
    """A cascade's UNets are in its stages' folders: the refusal names those (`stage_1/unet`), the main network before
    the guide (loaded in its place, a guide gives worse images and no error), from its folder and its repo."""
    from test_cascade import unet

    from diffusers_sr3 import SR3CascadePipeline, SR3UnconditionalPipeline, SR3UNet2DModel, make_scheduler

    guided = SR3Pipeline(
        unet(6, 32), make_scheduler("ddim", n_timestep=50), upscale_factor=4, guidance_unet=unet(6, 32)
    )
    base = SR3UnconditionalPipeline(unet(3, 8), make_scheduler("ddim", n_timestep=50))
    cascade = SR3CascadePipeline.from_stages(base, [guided])
    cascade.save_pretrained(tmp_path / "cascade")
    publish(hub, "someone/cascade", tmp_path / "cascade")
    for source in (str(tmp_path / "cascade"), "someone/cascade"):
        with pytest.raises(FileNotFoundError, match=r"holds a whole pipeline \(SR3CascadePipeline") as refused:
            SR3UNet2DModel.from_pretrained(source)
        loads = [
            f"SR3UNet2DModel.from_pretrained({source!r}, subfolder={name!r})"
            for name in ("base/unet", "stage_1/unet", "stage_1/guidance_unet")
        ]
        message = str(refused.value)
        assert [message.index(load) for load in loads] == sorted(message.index(load) for load in loads), message
        assert message.endswith(f"or the pipeline with SR3CascadePipeline.from_pretrained({source!r})")
        SR3UNet2DModel.from_pretrained(source, subfolder="stage_1/unet")


def test_a_folder_whose_model_index_is_damaged_gets_the_error_of_a_folder_without_a_unet(tiny_pipeline, tmp_path):
    """A model_index.json that is not an index names no pipeline: the error stays the one naming the missing
    config.json, not a JSON parser's."""
    from diffusers_sr3 import SR3UNet2DModel

    tiny_pipeline.save_pretrained(tmp_path / "saved")
    for damaged in (b"{not json", b"[]", b"\xff\xfe"):
        (tmp_path / "saved" / "model_index.json").write_bytes(damaged)
        with pytest.raises(OSError, match="config.json") as refused:
            SR3UNet2DModel.from_pretrained(tmp_path / "saved")
        assert "whole pipeline" not in str(refused.value)


def test_a_diffusers_pipeline_without_sr3_unets_loaded_as_a_model_is_told_to_load_the_pipeline(tmp_path):
    """No UNet of this class to name: the error says to load the pipeline, in a sentence that reads."""
    from diffusers_sr3 import SR3UNet2DModel

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]}', encoding="utf-8"
    )
    with pytest.raises(FileNotFoundError) as refused:
        SR3UNet2DModel.from_pretrained(tmp_path / "other")
    assert str(refused.value).endswith(
        "it has no config.json; load the pipeline with "
        f"StableDiffusionPipeline.from_pretrained({str(tmp_path / 'other')!r})"
    )


def test_a_model_index_naming_its_own_folder_as_a_pipeline_is_refused_not_a_recursion_error(tmp_path):
    """A component named "." or "" (its folder the pipeline's own) was read as a stage over and over: RecursionError
    in place of the refusal. Diffusers' components are named by their pipeline's arguments, which these cannot be."""
    from diffusers_sr3 import SR3UNet2DModel

    (tmp_path / "loop").mkdir()
    for name in (".", ""):
        (tmp_path / "loop" / "model_index.json").write_text(
            f'{{"_class_name": "SR3CascadePipeline", "{name}": ["diffusers_sr3", "SR3Pipeline"]}}', encoding="utf-8"
        )
        with pytest.raises(FileNotFoundError, match=r"holds a whole pipeline \(SR3CascadePipeline"):
            SR3UNet2DModel.from_pretrained(tmp_path / "loop")
