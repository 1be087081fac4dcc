"""Pipeline folders: the custom-code layout, both loaders, atomic saves and clear refusals."""

import copy
import errno
import json
import os
import re
import stat

import PIL.Image
import pytest
import torch
from conftest import needs_bfloat16_kernels
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler
from test_hub import hub  # noqa: F401  (the loopback Hub fixture)

from diffusers_sr3 import SR3BasePipeline, SR3Pipeline, SR3UnconditionalPipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.pipelines import base


def sample(pipeline, **kwargs):
    return pipeline(
        PIL.Image.new("RGB", (8, 8), "purple"),
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **kwargs,
    ).images


def test_layout_on_disk(tmp_path, tiny_pipeline):
    tiny_pipeline.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text(encoding="utf-8"))
    assert index["_class_name"] == ["pipeline_sr3", "SR3Pipeline"]
    assert index["unet"] == ["unet_sr3", "SR3UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["upscale_factor"] == 4
    assert "from diffusers_sr3 import SR3Pipeline" in (tmp_path / "pipeline_sr3.py").read_text(encoding="utf-8")
    assert "from diffusers_sr3 import SR3UNet2DModel" in (tmp_path / "unet" / "unet_sr3.py").read_text(encoding="utf-8")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.parent.glob(".sr3-save-*"))
    assert not list(tmp_path.glob(".sr3-save-*"))


def test_both_loaders_give_the_same_pipeline(tmp_path, tiny_pipeline):
    reference = sample(tiny_pipeline)
    tiny_pipeline.save_pretrained(tmp_path)
    ours = SR3Pipeline.from_pretrained(tmp_path)
    ours.set_progress_bar_config(disable=True)
    torch.testing.assert_close(sample(ours), reference)
    generic = DiffusionPipeline.from_pretrained(str(tmp_path), trust_remote_code=True)
    generic.set_progress_bar_config(disable=True)
    assert type(generic) is SR3Pipeline and type(generic.unet) is SR3UNet2DModel
    torch.testing.assert_close(sample(generic), reference)
    # Saving what Diffusers loaded writes the same layout again.
    generic.save_pretrained(tmp_path / "again")
    assert (
        json.loads((tmp_path / "again" / "model_index.json").read_text(encoding="utf-8"))["_class_name"][0]
        == "pipeline_sr3"
    )
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(str(tmp_path))


def test_loaded_weights_are_aligned_so_a_reload_is_bit_exact(tmp_path, tiny_pipeline):
    """Weights viewed into the file's buffer sit at odd offsets; some CPU kernels round differently there."""
    tiny_pipeline.save_pretrained(tmp_path)
    for loaded in (
        SR3UNet2DModel.from_pretrained(tmp_path / "unet"),
        SR3UNet2DModel.from_pretrained(tmp_path / "unet", output_loading_info=True)[0],
        SR3Pipeline.from_pretrained(tmp_path).unet,
        DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True).unet,
    ):
        assert all(tensor.data_ptr() % 64 == 0 for tensor in [*loaded.parameters(), *loaded.buffers()])
        for saved, reloaded in zip(tiny_pipeline.unet.state_dict().values(), loaded.state_dict().values()):
            assert torch.equal(saved, reloaded)


@needs_bfloat16_kernels
def test_loading_options(tmp_path, tiny_pipeline):
    tiny_pipeline.save_pretrained(tmp_path)
    bf16 = SR3Pipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.unet.conv_in.weight.dtype == torch.bfloat16
    bf16.set_progress_bar_config(disable=True)
    assert sample(bf16).dtype == torch.float32
    scheduler = DPMSolverMultistepScheduler.from_config(tiny_pipeline.scheduler.config)
    swapped = SR3Pipeline.from_pretrained(tmp_path, scheduler=scheduler, upscale_factor=2)
    assert swapped.scheduler is scheduler and swapped.config.upscale_factor == 2
    assert type(SR3BasePipeline.from_pretrained(tmp_path)) is SR3Pipeline
    assert type(SR3Pipeline.from_pipe(swapped)) is SR3Pipeline
    with pytest.raises(TypeError, match="unexpected arguments"):
        SR3Pipeline.from_pretrained(tmp_path, num_steps=3)


def test_unconditional_round_trip_and_wrong_class(tmp_path):
    unet = SR3UNet2DModel(
        in_channels=3, block_out_channels=8, channel_multipliers=(1, 2), norm_groups=4, sample_size=16
    )
    pipeline = SR3UnconditionalPipeline(unet, make_scheduler("ddim", n_timestep=50))
    pipeline.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text(encoding="utf-8"))
    assert index["_class_name"] == ["pipeline_sr3_unconditional", "SR3UnconditionalPipeline"]
    loaded = SR3BasePipeline.from_pretrained(tmp_path)
    assert type(loaded) is SR3UnconditionalPipeline and type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert type(DiffusionPipeline.from_pretrained(str(tmp_path), trust_remote_code=True)) is SR3UnconditionalPipeline
    with pytest.raises(ValueError, match="holds a SR3UnconditionalPipeline, not a SR3Pipeline"):
        SR3Pipeline.from_pretrained(tmp_path)


def test_bad_folders_are_named(tmp_path, tiny_pipeline):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        SR3Pipeline.from_pretrained(tmp_path)
    tiny_pipeline.save_pretrained(tmp_path / "p")
    index_path = tmp_path / "p" / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["unet"] = ["somewhere", "EvilModel"]
    index_path.write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(ValueError, match="not a Diffusers or SR3 class"):
        SR3Pipeline.from_pretrained(tmp_path / "p")


def test_a_failed_save_keeps_the_previous_folder(tmp_path, tiny_pipeline, monkeypatch):
    target = tmp_path / "out"
    tiny_pipeline.save_pretrained(target)
    (target / "checkpoint-10").mkdir()
    (target / "checkpoint-10" / "state.txt").write_text("keep me", encoding="utf-8")
    before = (target / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    def crash(folder):
        raise OSError("disk full")

    monkeypatch.setattr(base, "write_remote_code_layout", crash)
    with torch.no_grad():
        for parameter in tiny_pipeline.unet.parameters():
            parameter.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        tiny_pipeline.save_pretrained(target)
    assert (target / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert (target / "checkpoint-10" / "state.txt").read_text(encoding="utf-8") == "keep me"
    assert not list(tmp_path.glob(".sr3-save-*")) and not list(target.glob(".sr3-save-*"))
    monkeypatch.undo()
    tiny_pipeline.save_pretrained(target)  # a good save replaces the pipeline and keeps the checkpoint
    assert (target / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != before
    assert (target / "checkpoint-10" / "state.txt").exists()


@pytest.mark.skipif(os.name == "nt", reason="Windows files have no permission bits to compare")
@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_saved_files_get_the_permissions_of_new_files(tmp_path, tiny_pipeline, umask):
    """Weights readable by their owner alone beside a readable config (safetensors writes a 0600 temporary): another
    user of a shared model folder could list the model but not load it."""
    previous = os.umask(umask)
    try:
        tiny_pipeline.save_pretrained(tmp_path / "pipeline")
        tiny_pipeline.unet.save_pretrained(tmp_path / "unet")
    finally:
        os.umask(previous)
    modes = {path.relative_to(tmp_path).as_posix(): oct(path.stat().st_mode & 0o777) for path in tmp_path.rglob("*.*")}
    assert "pipeline/unet/diffusion_pytorch_model.safetensors" in modes and "unet/config.json" in modes
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_a_read_only_subfolder_stops_a_resave_before_it_changes_the_folder(tmp_path, tiny_pipeline, monkeypatch):
    """A model copied from a read-only place keeps its read-only subfolders: a save over it must fail before its move
    removes the index, not leave a folder that neither loads nor finishes its save until the mode is changed."""
    target = tmp_path / "copied"
    tiny_pipeline.save_pretrained(target)
    before = {path: path.read_bytes() for path in target.rglob("*") if path.is_file()}
    locked = target / "unet"
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes into read-only folders: refuse the writes there as for anyone else
        real_access, real_remove, real_replace = os.access, os.remove, os.replace

        def in_locked(path):
            return os.path.dirname(os.path.abspath(path)) == str(locked)

        def access(path, mode, **kwargs):
            return not (os.path.abspath(path) == str(locked) and mode & os.W_OK) and real_access(path, mode, **kwargs)

        def remove(path, **kwargs):
            if in_locked(path):
                raise PermissionError(errno.EACCES, "Permission denied", path)
            return real_remove(path, **kwargs)

        def replace(source, destination, **kwargs):
            if in_locked(destination):
                raise PermissionError(errno.EACCES, "Permission denied", destination)
            return real_replace(source, destination, **kwargs)

        monkeypatch.setattr(os, "access", access)
        monkeypatch.setattr(os, "remove", remove)
        monkeypatch.setattr(os, "replace", replace)
    with torch.no_grad():
        for parameter in tiny_pipeline.unet.parameters():
            parameter.add_(1.0)
    try:
        with pytest.raises(PermissionError, match=re.escape(f"{locked} is not a writable folder")):
            tiny_pipeline.save_pretrained(target)
    finally:
        locked.chmod(0o755)
        monkeypatch.undo()
    assert {path: path.read_bytes() for path in target.rglob("*") if path.is_file()} == before
    SR3Pipeline.from_pretrained(target)  # still the previous save, whole


def test_a_save_into_a_sticky_folder_of_another_user_refuses_files_it_may_not_replace(
    tmp_path, tiny_pipeline, monkeypatch
):
    """In a sticky folder (mode +t) of another user, only a file's owner may rename or remove it, though the folder
    is writable: the writable check passed, then the move stopped halfway (the index removed, `unet/` not moved),
    leaving the folder unloadable until `finish_interrupted_save`. The save refuses first, naming the file, and
    changes nothing; where this user owns the files it replaces, it goes on."""
    target = tmp_path / "models"
    tiny_pipeline.save_pretrained(target)
    before = {path: path.read_bytes() for path in target.rglob("*") if path.is_file()}
    unet_folder = target / "unet"
    for folder in (target, unet_folder):
        folder.chmod(0o1777)
    # This process as another user than the one owning the folders and files (root ignores sticky folders); the
    # files at the top as its own.
    user = os.geteuid() + 1000
    own = {os.path.join(target, entry) for entry in os.listdir(target)}
    real_lstat, real_remove, real_replace = os.lstat, os.remove, os.replace

    def lstat(path, *args, **kwargs):
        status = real_lstat(path, *args, **kwargs)
        if kwargs.get("dir_fd") is None and os.fspath(path) in own:
            return os.stat_result(tuple(status)[:4] + (user,) + tuple(status)[5:])
        return status

    def refused(path, **kwargs):  # the kernel's rule for a non-owner in another user's sticky folder
        if kwargs.get("dir_fd") is not None or not os.path.lexists(path):
            return False
        folder = os.stat(os.path.dirname(os.path.abspath(path)))
        return folder.st_mode & stat.S_ISVTX and folder.st_uid != user and lstat(path).st_uid != user

    def remove(path, **kwargs):
        if refused(path, **kwargs):
            raise PermissionError(errno.EPERM, "Operation not permitted", path)
        return real_remove(path, **kwargs)

    def replace(source, destination, **kwargs):
        if refused(destination, dir_fd=kwargs.get("dst_dir_fd")):
            raise PermissionError(errno.EPERM, "Operation not permitted", destination)
        return real_replace(source, destination, **kwargs)

    monkeypatch.setattr(os, "geteuid", lambda: user)
    monkeypatch.setattr(os, "lstat", lstat)
    monkeypatch.setattr(os, "remove", remove)
    monkeypatch.setattr(os, "replace", replace)
    with torch.no_grad():
        for parameter in tiny_pipeline.unet.parameters():
            parameter.add_(1.0)
    refusal = re.escape(f"{unet_folder}{os.sep}config.json belongs to another user, and {unet_folder} is a sticky")
    with pytest.raises(PermissionError, match=refusal):
        tiny_pipeline.save_pretrained(target)
    assert {path: path.read_bytes() for path in target.rglob("*") if path.is_file()} == before
    assert base.staging_folders(str(target)) == []
    SR3Pipeline.from_pretrained(target)  # still the previous save, whole
    unet_folder.chmod(0o777)  # not sticky: the files in it are replaced as in any writable folder
    tiny_pipeline.save_pretrained(target)
    saved = SR3Pipeline.from_pretrained(target).unet.conv_in.weight
    torch.testing.assert_close(saved, tiny_pipeline.unet.conv_in.weight)


def test_variants_are_saved_side_by_side_and_a_resave_leaves_no_stale_weights(tmp_path, tiny_pipeline):
    tiny_pipeline.save_pretrained(tmp_path)
    main_weight = tiny_pipeline.unet.conv_in.weight.clone()
    variant = copy.deepcopy(tiny_pipeline)
    with torch.no_grad():
        variant.unet.conv_in.weight.add_(1.0)
    variant.save_pretrained(tmp_path, variant="fp16")
    unet_files = {path.name for path in (tmp_path / "unet").iterdir()}
    assert {"diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"} <= unet_files
    torch.testing.assert_close(SR3Pipeline.from_pretrained(tmp_path).unet.conv_in.weight, main_weight)
    loaded_variant = SR3Pipeline.from_pretrained(tmp_path, variant="fp16")
    torch.testing.assert_close(loaded_variant.unet.conv_in.weight, main_weight + 1)

    # The variant again, sharded: its single file goes, the main weights stay.
    variant.save_pretrained(tmp_path, variant="fp16", max_shard_size="20KB")
    variant_files = sorted(path.name for path in (tmp_path / "unet").glob("*.fp16*"))
    assert len(variant_files) > 2 and "diffusion_pytorch_model.fp16.safetensors" not in variant_files
    loaded_variant = SR3Pipeline.from_pretrained(tmp_path, variant="fp16")
    torch.testing.assert_close(loaded_variant.unet.conv_in.weight, main_weight + 1)
    # The main weights as pickles: the safetensors that Diffusers would load first are gone.
    tiny_pipeline.save_pretrained(tmp_path, safe_serialization=False)
    assert not (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").exists()
    assert sorted(path.name for path in (tmp_path / "unet").glob("*.fp16*")) == variant_files
    loaded = SR3Pipeline.from_pretrained(tmp_path, use_safetensors=False)
    torch.testing.assert_close(loaded.unet.conv_in.weight, main_weight)


def test_a_save_stays_inside_its_folder(tmp_path, tiny_pipeline, monkeypatch):
    """A mount point (or a symlink to another disk) cannot take a rename from its parent, and a read-only parent
    takes no staging folder: the save must write nothing outside `save_directory`."""
    target = tmp_path / "mount"
    target.mkdir()
    inside = str(target) + os.sep
    real_replace, real_mkdtemp = os.replace, base.tempfile.mkdtemp

    def same_filesystem_only(source, destination, src_dir_fd=None):
        # A move relative to a folder's descriptor is from below the staging folder that `mkdtemp` made (checked).
        if src_dir_fd is None and not os.path.abspath(source).startswith(inside):
            raise OSError(errno.EXDEV, "Invalid cross-device link", source)
        return real_replace(source, destination, src_dir_fd=src_dir_fd)

    def writable_folder_only(*args, dir=None, **kwargs):
        if not os.path.abspath(dir).startswith(str(target)):
            raise OSError(errno.EROFS, "Read-only file system", dir)
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(os, "replace", same_filesystem_only)
    monkeypatch.setattr(base.tempfile, "mkdtemp", writable_folder_only)
    tiny_pipeline.save_pretrained(target)
    monkeypatch.undo()
    assert not list(tmp_path.glob(".*")) and not list(target.glob(".sr3-save-*"))
    torch.testing.assert_close(
        SR3Pipeline.from_pretrained(target).unet.conv_in.weight, tiny_pipeline.unet.conv_in.weight
    )


def test_a_killed_saves_staging_folder_is_removed_by_the_next_save(tmp_path, tiny_pipeline, monkeypatch):
    stale = tmp_path / ".sr3-save-killed"
    (stale / "unet").mkdir(parents=True)
    (stale / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half a model")
    tiny_pipeline.save_pretrained(tmp_path)
    assert not list(tmp_path.glob(".sr3-save-*"))
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size > len(b"half a model")

    def crash(folder):
        raise OSError("disk full")

    # A failed first save into a new folder leaves no folder behind.
    monkeypatch.setattr(base, "write_remote_code_layout", crash)
    with pytest.raises(OSError, match="disk full"):
        tiny_pipeline.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_both_loaders_take_a_passed_guide_or_none(tmp_path, tiny_pipeline, tiny_unet):
    guide, other = (SR3UNet2DModel.from_config(tiny_unet.config) for _ in range(2))
    guided = SR3Pipeline(tiny_unet, tiny_pipeline.scheduler, guidance_unet=guide)
    assert SR3Pipeline(tiny_unet, tiny_pipeline.scheduler).guidance_unet is None
    assert SR3Pipeline.from_pipe(guided).guidance_unet is guide
    guided.save_pretrained(tmp_path)
    for load in (
        SR3Pipeline.from_pretrained,
        lambda folder, **kwargs: DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, **kwargs),
    ):
        assert isinstance(load(tmp_path).guidance_unet, SR3UNet2DModel)
        assert load(tmp_path, guidance_unet=other).guidance_unet is other
        assert load(tmp_path, guidance_unet=None).guidance_unet is None
        assert load(tmp_path, unet=other).unet is other


def test_the_generic_loader_takes_a_passed_cascade_stage_or_none(tmp_path, tiny_pipeline):
    from diffusers_sr3 import SR3CascadePipeline

    SR3CascadePipeline.from_stages(None, [tiny_pipeline, tiny_pipeline]).save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True, stage_2=None)
    assert loaded.stage_1 is not None and loaded.stage_2 is None
    assert DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True, stage_2=tiny_pipeline).stage_2 is (
        tiny_pipeline
    )


def test_a_unet_pushed_alone_uploads_its_reexport_and_loads_through_automodel(tmp_path, tiny_unet, hub):  # noqa: F811
    from diffusers import AutoModel

    tiny_unet.push_to_hub("someone/unet")
    tiny_unet.save_pretrained(str(tmp_path), push_to_hub=True, repo_id="someone/saved", variant="fp16")
    for repo in ("someone/unet", "someone/saved"):
        uploaded = hub.repos[repo]
        assert b"from diffusers_sr3 import SR3UNet2DModel" in uploaded["unet_sr3.py"]
        assert json.loads(uploaded["config.json"])["auto_map"] == {"AutoModel": "unet_sr3.SR3UNet2DModel"}
    loaded = AutoModel.from_pretrained("someone/unet", trust_remote_code=True)
    sample = torch.randn(1, 6, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, 0.5).sample, tiny_unet(sample, 0.5).sample, rtol=0, atol=0)
