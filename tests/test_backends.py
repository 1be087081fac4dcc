"""The ONNX Runtime backend (optional extra): its output matches eager PyTorch on tiny models."""

import os

import pytest
import torch
from conftest import low_resolution_unet

from diffusers_sr3 import SR3Pipeline, make_scheduler
from diffusers_sr3.backends import OnnxUNet, swap_unet, unet_fingerprint, use_backend
from diffusers_sr3.tiling import tiled_super_resolve

pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SR3_CACHE_DIR", str(tmp_path / "cache"))


def test_onnx_unet_matches_eager_for_any_batch_and_size():
    unet = low_resolution_unet()
    onnx_unet = OnnxUNet.from_unet(unet)
    assert onnx_unet.downsampling_factor == unet.downsampling_factor == 16
    assert onnx_unet.config == unet.config and onnx_unet.dtype == torch.float32
    for batch, height, width in [(1, 64, 64), (3, 48, 112), (2, 128, 16)]:
        sample = torch.randn(batch, 6, height, width, generator=torch.Generator().manual_seed(batch))
        level = torch.rand(batch, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            expected = unet(sample, level).sample
        got = onnx_unet(sample, level).sample
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()
    # A single level applies to the whole batch, as with the eager UNet.
    sample = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        assert torch.allclose(onnx_unet(sample, 0.5, return_dict=False)[0], unet(sample, 0.5)[0], atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        onnx_unet(torch.randn(1, 6, 40, 40), 0.5)


def test_condition_noise_models_export_their_second_level():
    unet = low_resolution_unet(condition_noise_embedding=True)
    onnx_unet = OnnxUNet.from_unet(unet)
    sample, level = torch.randn(2, 6, 32, 48), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        expected = unet(sample, level, condition_noise_level=torch.tensor([0.0, 0.2]))[0]
    assert torch.allclose(onnx_unet(sample, level, torch.tensor([0.0, 0.2]))[0], expected, atol=1e-5)


def test_onnx_unet_takes_the_unets_arguments_and_gives_its_errors():
    unet = low_resolution_unet()
    onnx_unet = OnnxUNet.from_unet(unet)
    sample = torch.randn(1, 6, 32, 32)
    with torch.no_grad():
        expected = unet(sample, 0.5).sample
    assert torch.allclose(onnx_unet(sample, signal_level=0.5).sample, expected, atol=1e-5)
    with pytest.warns(FutureWarning, match="renamed signal_level"):
        assert torch.allclose(onnx_unet(sample, noise_level=0.5).sample, expected, atol=1e-5)
    with pytest.raises(ValueError, match="signal_level has 2 values for a batch of 1"):
        onnx_unet(sample, torch.tensor([0.3, 0.8]))
    with pytest.raises(ValueError, match=r"sample must be \(batch, channels, height, width\)"):
        onnx_unet(sample[0], 0.5)
    with pytest.raises(ValueError, match="sample has 3 channels but the model expects 6"):
        onnx_unet(sample[:, :3], 0.5)
    with pytest.raises(ValueError, match="conditioning_type='noise_level'"):
        onnx_unet(sample, torch.tensor([75]))


def test_exports_are_cached_by_weights(tmp_path):
    unet = low_resolution_unet()
    first = OnnxUNet.from_unet(unet)
    modified = os.path.getmtime(first.path)
    assert OnnxUNet.from_unet(unet).path == first.path and os.path.getmtime(first.path) == modified
    assert first.path.startswith(str(tmp_path / "cache" / "onnx"))
    with torch.no_grad():
        unet.conv_in.bias.add_(0.1)
    assert OnnxUNet.from_unet(unet).path != first.path
    assert unet_fingerprint(unet) in OnnxUNet.from_unet(unet).path


@pytest.mark.parametrize("mode", ["fidelity", "detail"])
def test_pipeline_on_the_onnx_backend_matches_eager(mode):
    unet = low_resolution_unet()
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample_range=4.0)
    pipeline = SR3Pipeline(unet, scheduler, upscale_factor=4, residual=True, residual_scale=2.0)
    pipeline.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 20, 36, generator=torch.Generator().manual_seed(3))

    def run(**tiling):
        generator = torch.Generator().manual_seed(0)
        return tiled_super_resolve(
            pipeline, image, mode=mode, num_inference_steps=3, generator=generator, output_type="pt", **tiling
        ).images

    eager = run()
    eager_tiled = run(tile_size=64, overlap=16)
    with use_backend(pipeline, "onnx") as network:
        assert isinstance(pipeline.unet, OnnxUNet) and network is pipeline.unet
        onnx = run()
        onnx_tiled = run(tile_size=64, overlap=16)
    assert pipeline.unet is unet and "unet" in pipeline.config
    assert torch.allclose(onnx, eager, atol=1e-5) and torch.allclose(onnx_tiled, eager_tiled, atol=1e-5)
    with swap_unet(pipeline, OnnxUNet.from_unet(unet)):
        assert torch.allclose(run(), eager, atol=1e-5)
    with pytest.raises(ValueError, match="backend must be"):
        with use_backend(pipeline, "tensorrt"):
            pass


@pytest.mark.parametrize("missing", ["onnxruntime", "onnx"])
def test_a_missing_onnx_package_is_one_line_naming_the_extra(missing, monkeypatch, tmp_path, capsys):
    import sys

    import PIL.Image

    from diffusers_sr3.cli import main

    pipeline = SR3Pipeline(low_resolution_unet(), make_scheduler("ddim", n_timestep=100), upscale_factor=4)
    pipeline.save_pretrained(tmp_path / "model")
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    argv = ["upscale", str(tmp_path / "small.png"), "--model", str(tmp_path / "model"), "--backend", "onnx"]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    # Commands that work for a wheel install too (no source checkout needed).
    error = capsys.readouterr().err
    assert f"the ONNX backend needs {missing}: pip install onnxruntime onnx (" in error
    assert 'pip install "diffusers-sr3[onnx]"' in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "failure, message",
    [
        # onnxruntime before 1.19 beside numpy 2.
        (
            "raise ImportError('numpy.core.multiarray failed to import\\n_ARRAY_API not found')",
            "numpy.core.multiarray failed to import",
        ),
        # A module that the package imports is missing: the package is there, so "install it" would not help.
        ("import a_dependency_that_is_not_installed", "No module named 'a_dependency_that_is_not_installed'"),
    ],
    ids=["numpy_abi", "missing_dependency"],
)
def test_an_onnx_package_that_fails_to_import_is_reported_with_its_own_error(failure, message, monkeypatch, tmp_path):
    import sys

    from diffusers_sr3.backends import _require

    package = tmp_path / "site" / "onnxruntime"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(failure + "\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    with pytest.raises(ImportError) as raised:
        _require("onnxruntime")
    assert str(raised.value) == f"onnxruntime is installed but fails to import: {message}"


def fine_tuned(unet):
    """A copy of `unet` with different weights, as after more training."""
    other = low_resolution_unet()
    with torch.no_grad():
        other.conv_in.bias.add_(0.5)
    return other


def test_an_explicit_path_exported_from_other_weights_is_exported_again(tmp_path):
    import onnx

    unet = low_resolution_unet()
    other = fine_tuned(unet)
    path = str(tmp_path / "unet.onnx")
    OnnxUNet.from_unet(unet, path=path)
    reloaded = OnnxUNet.from_unet(other, path=path)
    sample = torch.randn(1, 6, 32, 32)
    with torch.no_grad():
        assert torch.allclose(reloaded(sample, 0.5)[0], other(sample, 0.5)[0], atol=1e-5)
    assert reloaded.fingerprint == unet_fingerprint(other)
    # A file without a fingerprint (an export from an earlier version, or someone else's) is exported again too.
    model = onnx.load(path)
    del model.metadata_props[:]
    onnx.save(model, path)
    assert OnnxUNet.from_unet(other, path=path).fingerprint == unet_fingerprint(other)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_a_damaged_cached_export_is_exported_again(damage):
    unet = low_resolution_unet()
    path = OnnxUNet.from_unet(unet).path
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"not a model" * 50}[damage])
    onnx_unet = OnnxUNet.from_unet(unet)
    assert onnx_unet.path == path and os.path.getsize(path) == len(data)
    sample = torch.randn(1, 6, 32, 32)
    with torch.no_grad():
        assert torch.allclose(onnx_unet(sample, 0.5)[0], unet(sample, 0.5)[0], atol=1e-5)


def test_an_unwritable_cache_folder_is_one_line_naming_it_and_sr3_cache_dir(tmp_path, monkeypatch, capsys):
    import PIL.Image

    import diffusers_sr3.backends as backends
    from diffusers_sr3.cli import main

    pipeline = SR3Pipeline(low_resolution_unet(), make_scheduler("ddim", n_timestep=100), upscale_factor=4)
    pipeline.save_pretrained(tmp_path / "model")
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    cache = tmp_path / "read-only"
    monkeypatch.setenv("SR3_CACHE_DIR", str(cache))
    makedirs = os.makedirs

    def read_only_makedirs(name, *args, **kwargs):  # the tests run as root, whom chmod does not stop
        if str(name).startswith(str(cache)):
            raise PermissionError(13, "Permission denied", str(cache))
        return makedirs(name, *args, **kwargs)

    monkeypatch.setattr(backends.os, "makedirs", read_only_makedirs)
    argv = ["upscale", str(tmp_path / "small.png"), "--model", str(tmp_path / "model"), "--backend", "onnx"]
    assert main([*argv, "--quiet", "--output", str(tmp_path / "out.png")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(cache / "onnx") in error and "SR3_CACHE_DIR" in error, error
    assert "Permission denied" in error
    with pytest.raises(OSError, match="Permission denied"):  # still an OSError for callers that catch those
        OnnxUNet.from_unet(pipeline.unet)


def test_exports_are_readable_by_other_users_of_a_shared_cache():
    mask = os.umask(0o022)
    try:
        path = OnnxUNet.from_unet(low_resolution_unet()).path
    finally:
        os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_the_fingerprint_ignores_where_the_weights_were_loaded_from(tmp_path):
    import shutil

    from diffusers_sr3 import SR3UNet2DModel

    low_resolution_unet().save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    first, second = (SR3UNet2DModel.from_pretrained(tmp_path / name) for name in "ab")
    assert first.config["_name_or_path"] != second.config["_name_or_path"]
    assert unet_fingerprint(first) == unet_fingerprint(second)
    assert OnnxUNet.from_unet(first).path == OnnxUNet.from_unet(second).path


def test_staging_files_of_dead_exports_are_removed(tmp_path):
    import socket
    import subprocess
    import sys

    folder = tmp_path / "cache" / "onnx"
    folder.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = folder / f".SR3UNet2DModel-0.onnx.{host}.{int(dead.stdout)}.tmp"
    running = folder / f".SR3UNet2DModel-1.onnx.{host}.{os.getppid()}.tmp"  # an export still in progress
    other_host = folder / f".SR3UNet2DModel-2.onnx.elsewhere.{int(dead.stdout)}.tmp"
    for path in (stale, running, other_host):
        path.write_bytes(b"partial")
    path = OnnxUNet.from_unet(low_resolution_unet()).path
    assert sorted(os.listdir(folder)) == sorted([os.path.basename(path), running.name, other_host.name])


def test_the_onnx_backend_unwraps_a_compiled_unet():
    unet = low_resolution_unet()
    compiled = torch.compile(unet)
    onnx_unet = OnnxUNet.from_unet(compiled)
    sample = torch.randn(1, 6, 32, 32)
    with torch.no_grad():
        assert torch.allclose(onnx_unet(sample, 0.5)[0], unet(sample, 0.5)[0], atol=1e-5)
    assert unet_fingerprint(compiled) == unet_fingerprint(unet)  # the same export as the module it compiles


def test_the_guidance_unet_is_exported_only_when_it_runs(tmp_path):
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample_range=4.0)
    unet = low_resolution_unet()
    pipeline = SR3Pipeline(unet, scheduler, upscale_factor=4, guidance_unet=fine_tuned(unet))
    pipeline.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))

    def run(**options):
        generator = torch.Generator().manual_seed(0)
        return pipeline(image, num_inference_steps=2, generator=generator, output_type="pt", **options).images

    cache = tmp_path / "cache" / "onnx"
    eager = run(mode="detail", guidance_scale=2.0)
    with use_backend(pipeline, "onnx"):
        run(mode="fidelity")
        assert len(os.listdir(cache)) == 1
        guided = run(mode="detail", guidance_scale=2.0)
        assert len(os.listdir(cache)) == 2
    assert torch.allclose(guided, eager, atol=1e-5)


def test_the_onnx_backend_names_the_dtype_option():
    pipeline = SR3Pipeline(low_resolution_unet(), make_scheduler("ddim", n_timestep=100), upscale_factor=4)
    pipeline.to(torch.bfloat16)
    with pytest.raises(ValueError, match="--dtype float32"):
        with use_backend(pipeline, "onnx"):
            pass
