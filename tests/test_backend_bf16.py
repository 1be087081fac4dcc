"""The bfloat16 mixed-precision backend: autocast really runs, outputs stay close to float32, `auto` chooses it only
where bfloat16 is fast, and the UNet is left as it was."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import low_resolution_unet, needs_bfloat16_kernels

import diffusers_sr3.backends as backends
from diffusers_sr3 import SR3BasePipeline, SR3Pipeline, make_scheduler
from diffusers_sr3.backends import AutocastUNet, resolve_backend, use_backend
from diffusers_sr3.cli import main
from diffusers_sr3.tiling import tiled_super_resolve


def make_pipeline():
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample_range=4.0)
    pipeline = SR3Pipeline(low_resolution_unet(), scheduler, upscale_factor=4, residual=True, residual_scale=2.0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_autocast_unet_computes_in_bfloat16_and_answers_in_float32():
    unet = low_resolution_unet()
    sample, level = torch.randn(2, 6, 32, 48, generator=torch.Generator().manual_seed(1)), torch.tensor([0.2, 0.9])
    with torch.no_grad():
        expected = unet(sample, level).sample
    seen = []
    hook = unet.conv_in.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    network = AutocastUNet(unet)
    assert network.downsampling_factor == unet.downsampling_factor and network.config == unet.config
    assert network.dtype == torch.float32 and network.device == unet.device
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = network(sample, level).sample
        tuple_output = network(sample, level, return_dict=False)[0]
    hook.remove()
    assert seen == [torch.bfloat16, torch.bfloat16]  # the convolutions ran in bfloat16
    assert got.dtype == torch.float32 and got.is_contiguous() and torch.equal(got, tuple_output)
    error = (got - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.05, error  # bfloat16's 8-bit mantissa: close, but not the float32 answer
    with pytest.raises(ValueError, match="float32 UNet"):
        AutocastUNet(low_resolution_unet().to(torch.bfloat16))


def test_autocast_unet_gives_the_unets_input_errors():
    network = AutocastUNet(low_resolution_unet())
    with pytest.raises(ValueError, match=r"sample must be \(batch, channels, height, width\), got shape \(6, 32, 32\)"):
        network(torch.randn(6, 32, 32), 0.5)
    with pytest.raises(ValueError, match="signal_level has 2 values for a batch of 1"):
        network(torch.randn(1, 6, 32, 32), signal_level=torch.tensor([0.3, 0.8]))


@pytest.mark.parametrize("mode", ["fidelity", "detail"])
@needs_bfloat16_kernels
def test_pipeline_on_the_bf16_backend_stays_close_to_float32(mode):
    pipeline = make_pipeline()
    unet = pipeline.unet
    image = torch.rand(1, 3, 20, 36, generator=torch.Generator().manual_seed(3))

    def run(**tiling):
        generator = torch.Generator().manual_seed(0)
        return tiled_super_resolve(
            pipeline, image, mode=mode, num_inference_steps=3, generator=generator, output_type="pt", **tiling
        ).images

    eager, eager_tiled = run(), run(tile_size=64, overlap=16)
    with use_backend(pipeline, "bf16") as network:
        assert isinstance(pipeline.unet, AutocastUNet) and network is pipeline.unet
        mixed, mixed_tiled = run(), run(tile_size=64, overlap=16)
    assert pipeline.unet is unet and "unet" in pipeline.config
    assert all(parameter.is_contiguous() for parameter in unet.parameters())  # memory format restored
    for got, expected in ((mixed, eager), (mixed_tiled, eager_tiled)):
        assert not torch.equal(got, expected)
        difference = (got - expected).abs()
        assert difference.mean() < 0.5 / 255 and difference.max() < 8 / 255, (difference.mean(), difference.max())


def test_auto_picks_bf16_only_for_float32_networks_on_fast_hardware(monkeypatch):
    unet = low_resolution_unet()
    monkeypatch.setattr(backends, "fast_bfloat16", lambda device: True)
    assert resolve_backend("auto", unet) == "bf16"
    assert resolve_backend("auto", unet.to(torch.bfloat16)) == "torch"  # already low precision: left alone
    assert resolve_backend("onnx", unet) == "onnx" and resolve_backend("torch", unet) == "torch"
    monkeypatch.setattr(backends, "fast_bfloat16", lambda device: False)
    assert resolve_backend("auto", unet.to(torch.float32)) == "torch"
    with pytest.raises(ValueError, match="backend must be"):
        resolve_backend("tensorrt", unet)


@pytest.mark.parametrize(
    "amx, avx512_bf16, kernels, fast",
    [
        (True, True, "AVX512", True),
        (True, False, "AVX512", True),
        (False, True, "AVX512", True),
        (False, False, "AVX512", False),
        # ATEN_CPU_CAPABILITY=avx2 or default on an AMX CPU: torch's bfloat16 attention fails there.
        (True, True, "AVX2", False),
        (True, True, "DEFAULT", False),
    ],
)
def test_fast_bfloat16_asks_the_hardware(monkeypatch, amx, avx512_bf16, kernels, fast):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: kernels)
    assert backends.fast_bfloat16("cpu") is fast
    assert not backends.fast_bfloat16("meta")


@needs_bfloat16_kernels
def test_cli_backend_choices(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    make_pipeline().save_pretrained(folder)
    source = tmp_path / "photo.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(source)
    base = ["upscale", str(source), "--model", str(folder), "--mode", "fidelity", "--quiet", "--device", "cpu"]

    def upscale(name, *extra):
        assert main(base + ["--output", str(tmp_path / name), *extra]) == 0
        return np.asarray(PIL.Image.open(tmp_path / name)).astype(int)

    float32, mixed = upscale("torch.png", "--backend", "torch"), upscale("bf16.png", "--backend", "bf16")
    assert 0 < np.abs(float32 - mixed).max() <= 8 and np.abs(float32 - mixed).mean() < 0.5
    monkeypatch.setattr(backends, "fast_bfloat16", lambda device: False)
    assert np.array_equal(upscale("auto_slow.png"), float32)  # the default is auto
    monkeypatch.setattr(backends, "fast_bfloat16", lambda device: True)
    assert np.array_equal(upscale("auto_fast.png"), mixed)


@pytest.mark.parametrize("backend", ["onnx", pytest.param("bf16", marks=needs_bfloat16_kernels)])
def test_use_backend_applies_to_every_stage_of_a_cascade(backend, tmp_path, monkeypatch):
    from conftest import tiny_unet_config

    from diffusers_sr3 import SR3CascadePipeline, SR3UnconditionalPipeline, SR3UNet2DModel
    from diffusers_sr3.backends import OnnxUNet

    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    monkeypatch.setenv("SR3_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    base = SR3UnconditionalPipeline(
        SR3UNet2DModel(**tiny_unet_config(in_channels=3)).eval(), make_scheduler("ddim", n_timestep=100)
    )
    stage = SR3Pipeline(low_resolution_unet(), make_scheduler("ddim", n_timestep=100), upscale_factor=4)
    cascade = SR3CascadePipeline.from_stages(base, [stage])
    cascade.set_progress_bar_config(disable=True)
    networks = [base.unet, stage.unet]
    expected = cascade(num_inference_steps=[2, 2], generator=torch.Generator().manual_seed(0), output_type="pt")
    with use_backend(cascade, backend) as stand_ins:
        kind = OnnxUNet if backend == "onnx" else AutocastUNet
        assert [base.unet, stage.unet] == stand_ins and all(isinstance(network, kind) for network in stand_ins)
        got = cascade(num_inference_steps=[2, 2], generator=torch.Generator().manual_seed(0), output_type="pt")
    assert [base.unet, stage.unet] == networks
    assert (got.images - expected.images).abs().max() < (1e-5 if backend == "onnx" else 8 / 255)


def test_samples_one_deepest_pixel_across_run_in_float32():
    """oneDNN's bfloat16 stride-2 convolution with a one-pixel-wide output reads garbage (errors of 2, NaN through
    the packaged network): samples at most the downsampling factor high or wide must give float32's answer."""
    unet = low_resolution_unet()
    factor = unet.downsampling_factor
    network = AutocastUNet(unet)
    level = torch.tensor([0.5])
    for height, width in ((factor, 3 * factor), (3 * factor, factor), (factor, factor)):
        sample = torch.randn(1, 6, height, width, generator=torch.Generator().manual_seed(height + width))
        assert not network.mixed_precision(sample)
        with torch.no_grad():
            got, expected = network(sample, level).sample, unet(sample, level).sample
        torch.testing.assert_close(got, expected)  # float32's answer, not only a finite one
    # Two pixels across at the deepest level: bfloat16 is right there, and keeps its speed.
    sample = torch.randn(1, 6, 2 * factor, 2 * factor, generator=torch.Generator().manual_seed(0))
    assert network.mixed_precision(sample)
    with torch.no_grad():
        got, expected = network(sample, level).sample, unet(sample, level).sample
    assert 0 < (got - expected).abs().max() / expected.abs().max() < 0.05


@needs_bfloat16_kernels
def test_use_backend_gives_each_network_back_in_the_memory_format_it_had():
    """A UNet the user keeps channels-last stays channels-last after a bf16 block; a contiguous one stays
    contiguous (the block converted both to contiguous)."""
    guide = low_resolution_unet(seed=1)
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample=False)
    pipeline = SR3Pipeline(low_resolution_unet(), scheduler, residual=True, guidance_unet=guide, guidance_scale=2.0)
    pipeline.unet.to(memory_format=torch.channels_last)
    weight = pipeline.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    with use_backend(pipeline, "bf16"):
        pass
    weight = pipeline.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert all(parameter.is_contiguous() for parameter in pipeline.guidance_unet.parameters())


@needs_bfloat16_kernels
def test_small_samples_group_normalise_in_nchw_on_the_cpu(monkeypatch):
    # Channels-last GroupNorm on the CPU costs ~150 us per small sample: detail mode's windows (many 16x16 grids)
    # ran 2.2x their pixel share. The formats are what is checked here; benchmarks/window_cost.py times them.
    unet = low_resolution_unet()
    network = AutocastUNet(unet)
    norms = [module for module in unet.modules() if isinstance(module, torch.nn.GroupNorm)]
    seen = []
    hooks = [norm.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0])) for norm in norms]
    windows = torch.randn(8, 6, 64, 64, generator=torch.Generator().manual_seed(0))  # 16x16 grids and below
    whole = torch.randn(1, 6, 128, 128, generator=torch.Generator().manual_seed(1))  # a 32x32 grid on top
    with torch.no_grad():
        fast = network(windows, 0.5, return_dict=False)[0]
        assert seen and all(states.is_contiguous() for states in seen)
        seen.clear()
        network(whole, 0.5, return_dict=False)
        large = [states for states in seen if states[0, 0].numel() > backends.NCHW_GROUP_NORM_PIXELS]
        assert large and all(states.is_contiguous(memory_format=torch.channels_last) for states in large)
        assert all(states.is_contiguous() for states in seen if states[0, 0].numel() <= 16 * 16)
        monkeypatch.setattr(backends, "NCHW_GROUP_NORM_PIXELS", 0)
        seen.clear()
        channels_last = network(windows, 0.5, return_dict=False)[0]
        assert not all(states.is_contiguous() for states in seen)
        reference = unet(windows, 0.5, return_dict=False)[0]  # float32
    for hook in hooks:
        hook.remove()
    # As accurate against float32 either way (bf16 rounds differently in the two layouts), and no hook left on the
    # UNet once a call is over.
    error, channels_last_error = (fast - reference).abs(), (channels_last - reference).abs()
    assert error.max() < 0.05 and error.mean() < 1.25 * channels_last_error.mean()
    assert all(not norm._forward_pre_hooks for norm in norms)


def hold_kernels_below_avx512(monkeypatch):
    """Torch as under `ATEN_CPU_CAPABILITY=avx2` on a CPU with AMX (torch read the variable at start: its own kernels
    stay as they are)."""
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")


def test_bfloat16_asked_for_where_torch_cannot_run_it_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """`ATEN_CPU_CAPABILITY=avx2` on a CPU with AMX: torch's bfloat16 attention fails ("pack_vnni2 is only supported
    when avx512 is supported"), and `--backend bf16` ended in its traceback inside the model. Each explicit request
    says why and what to do instead, before the model loads."""
    source = tmp_path / "photo.png"
    PIL.Image.new("RGB", (12, 20)).save(source)
    hold_kernels_below_avx512(monkeypatch)

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(SR3BasePipeline, "from_pretrained", no_load)
    out = tmp_path / "out.png"
    for command, fix in (
        (["upscale", str(source), "--output", str(out), "--backend", "bf16"], "--backend torch"),
        (["upscale", str(source), "--output", str(out), "--dtype", "bf16"], "--dtype float32"),
        (["sample", "--model", str(tmp_path), "--output", str(out), "--dtype", "bfloat16"], "--dtype float32"),
    ):
        assert main([*command, "--device", "cpu"]) == 2
        error = capsys.readouterr().err
        assert "Traceback" not in error and len(error.strip().splitlines()) == 1, error
        request = " ".join(command[-2:])
        assert f"{request}: torch's CPU kernels are held at AVX2 (ATEN_CPU_CAPABILITY=avx2), below" in error, error
        assert f"unset ATEN_CPU_CAPABILITY, or use {fix}" in error, error
    assert not out.exists()
    # From Python too, where the backend is resolved: `auto` goes on in float32.
    unet = low_resolution_unet()
    with pytest.raises(ValueError, match="the bf16 backend: torch's CPU kernels are held at AVX2"):
        resolve_backend("bf16", unet)
    assert resolve_backend("auto", unet) == "torch"
    # Torch's own kernels where the CPU has no bfloat16 units, or on another device: nothing to refuse.
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    backends.check_bfloat16_runs("cpu", "--backend bf16", "--backend torch")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    backends.check_bfloat16_runs("meta", "--backend bf16", "--backend torch")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    backends.check_bfloat16_runs("cpu", "--backend bf16", "--backend torch")
