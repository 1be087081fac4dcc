"""Shared test setup: offline Hub, the fixtures that ship with the tests (tests/fixtures), and tiny models."""

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
# Hugging Face libraries read their cache folders once, when imported (huggingface_hub's hub cache, diffusers' modules
# cache, datasets' cache), so `_isolated_hub_cache` reaches only the processes that tests start. Pointed at this run's
# own folder before any of them is imported, the suite neither reads the user's caches (an offline load finding a model
# cached there) nor writes into them (a read-only home, or one shared with another run).
SESSION_HF_HOME = tempfile.mkdtemp(prefix="sr3-tests-hf-home-")
atexit.register(shutil.rmtree, SESSION_HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = SESSION_HF_HOME
for _cache in (
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_MODULES_CACHE",
    "HF_DATASETS_CACHE",
    "HF_EVALUATE_CACHE",
    "HF_METRICS_CACHE",  # evaluate's: its `compute` writes there
):
    os.environ.pop(_cache, None)  # each would win over HF_HOME
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_NO_ADVISORY_WARNINGS", "1")
# Tiny test models gain nothing from threads, and OpenMP spinning makes them crawl when processes share cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pathlib  # noqa: E402
import signal  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# A suite started in the background by a shell without job control (`pytest &` in a script) inherits SIGINT ignored,
# and Python then installs no KeyboardInterrupt handler: the Ctrl-C tests would fail for the runner's reason, not the
# code's.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = pathlib.Path(__file__).resolve().parents[1]
# Everything the tests read lives in the repository (tests/fixtures/README.md says where each file came from), so a
# clone passes its tests on any machine.
FIXTURE_ROOT = REPO / "tests" / "fixtures"
FIXTURES = FIXTURE_ROOT / "original_sr3"  # parity fixtures from the original SR3 code
PAIRS = FIXTURE_ROOT / "metric_pairs"  # HR/SR image pairs with known relations
SAMPLES = FIXTURE_ROOT / "original_samples"  # the original project's LR/HR/bicubic sample faces


def _bfloat16_kernels_held_back():
    from diffusers_sr3.backends import bfloat16_kernels_held_back

    return bfloat16_kernels_held_back()


# For tests that run bfloat16 on the CPU: under ATEN_CPU_CAPABILITY=avx2 (or default) on a CPU with bfloat16 units,
# torch's bfloat16 attention fails, and the package refuses the bf16 backend and --dtype bf16 there.
needs_bfloat16_kernels = pytest.mark.skipif(
    _bfloat16_kernels_held_back() is not None,
    reason="ATEN_CPU_CAPABILITY holds torch's CPU kernels below the AVX512 ones this CPU's bfloat16 attention needs",
)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores (still runs in CI)")


@pytest.fixture(autouse=True)
def _isolated_hub_cache(tmp_path, monkeypatch):
    """Keep every test away from the user's Hub cache and modules cache."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


def tiny_unet_config(**overrides):
    """The `tiny` preset's ~67k-parameter SR3 UNet config (x4, 32x32, 3 levels, attention at 8), for fast tests."""
    from diffusers_sr3.presets import get_preset

    config = get_preset("tiny").unet_config()
    config.update(overrides)
    return config


def low_resolution_unet(seed=0, **overrides):
    """A tiny SR3 UNet at the low-resolution grid (pixel-unshuffle 4, as the packaged network), its weights drawn
    with `seed`, in eval mode."""
    from diffusers_sr3 import SR3UNet2DModel

    torch.manual_seed(seed)
    return SR3UNet2DModel(**tiny_unet_config(sample_size=64, pixel_unshuffle_factor=4, **overrides)).eval()


@pytest.fixture
def tiny_unet():
    from diffusers_sr3 import SR3UNet2DModel

    torch.manual_seed(0)
    return SR3UNet2DModel(**tiny_unet_config()).eval()


@pytest.fixture
def tiny_pipeline(tiny_unet):
    from diffusers_sr3 import SR3Pipeline, make_scheduler

    pipeline = SR3Pipeline(tiny_unet, make_scheduler("ddpm", n_timestep=100), upscale_factor=4)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def guided_pipeline():
    """A low-resolution pipeline with an autoguidance guide (as the packaged model), 4 detail steps, seeded."""
    from diffusers_sr3 import SR3Pipeline, make_scheduler

    unet = low_resolution_unet()
    # Other weights than the UNet's: a guide equal to it makes guidance a no-op that tests could not notice.
    guide = low_resolution_unet(seed=1)
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample=False)
    pipeline = SR3Pipeline(unet, scheduler, residual=True, guidance_unet=guide, guidance_scale=2.0, detail_steps=4)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
