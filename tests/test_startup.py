"""A fast start: `import diffusers_sr3` and the `sr3` parsers import neither torch nor Diffusers, while every public
name still resolves and the pipelines' remote-code aliases are in place before Diffusers needs them."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

import diffusers_sr3
from diffusers_sr3 import cli

PUBLIC_NAMES = [
    "CheckpointError",
    "SR3BasePipeline",
    "SR3CascadePipeline",
    "SR3CascadePipelineOutput",
    "SR3Pipeline",
    "SR3PipelineOutput",
    "SR3UNet2DModel",
    "SR3UNet2DOutput",
    "SR3UnconditionalPipeline",
    "convert_original_checkpoint",
    "degrade",
    "finish_interrupted_save",
    "images_to_tensor",
    "make_beta_schedule",
    "make_scheduler",
    "noise_level_for_step",
    "sample_training_noise_levels",
    "swap_scheduler",
    "upsample_condition",
]
# What must not be imported on the way to a parser: seconds of start-up.
HEAVY = ("torch", "diffusers", "torchvision", "accelerate", "datasets", "tqdm")


def _python(code, heavy=HEAVY):
    """Run `code` in a fresh interpreter on this checkout's package, then print which of `heavy` it imported (JSON)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(name for name in {heavy!r} if name in sys.modules)))"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)


def test_the_package_and_every_parser_import_no_torch():
    code = """
import contextlib, io
import diffusers_sr3
assert diffusers_sr3.__version__ and len(diffusers_sr3.__all__) == 19 and "SR3Pipeline" in dir(diffusers_sr3)
from diffusers_sr3 import cli
cli.build_parser()
for command in [None, *cli.COMMANDS]:
    for arguments in ([command, "--help"], [command, "--no-such-option"]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                cli.main([argument for argument in arguments if argument])
            except SystemExit as leaving:
                assert leaving.code == (0 if arguments[1] == "--help" else 2), (arguments, leaving.code)
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == []


def test_public_names_resolve_as_before():
    assert diffusers_sr3.__all__ == PUBLIC_NAMES
    assert set(PUBLIC_NAMES) | {"__version__", "register_remote_code_modules", "pipelines"} <= set(dir(diffusers_sr3))
    for name in PUBLIC_NAMES:
        assert getattr(diffusers_sr3, name).__name__ == name
    from diffusers_sr3 import SR3Pipeline
    from diffusers_sr3.pipelines import pipeline_sr3

    assert SR3Pipeline is pipeline_sr3.SR3Pipeline and diffusers_sr3.pipelines.SR3Pipeline is SR3Pipeline
    assert diffusers_sr3.tiling.DEFAULT_MAX_TILE_PIXELS == 256 * 256  # submodules, as after the eager import
    namespace = {}
    exec("from diffusers_sr3 import *", namespace)
    assert set(PUBLIC_NAMES) <= set(namespace)
    # Diffusers asks a component's library for its base classes with getattr(library, name, None).
    assert getattr(diffusers_sr3, "ModelMixin", None) is None
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        diffusers_sr3.no_such_name  # noqa: B018 (the lookup is the test)


def test_every_module_imports_first():
    """Any module may be the first of the package a program imports (`from diffusers_sr3.tiling import ...`): none
    may meet a half-initialised one. The eager `__init__` imported the pipelines first and hid such cycles."""
    code = """
import importlib, pkgutil
import diffusers_sr3
names = [module.name for module in pkgutil.walk_packages(diffusers_sr3.__path__, "diffusers_sr3.")]
assert "diffusers_sr3.tiling" in names and "diffusers_sr3.pipelines.base" in names, names
failed = []
for name in names:
    if name.endswith("__main__"):  # runs the command line
        continue
    # The package alone leaves sys.modules: torch and Diffusers stay imported, so each round takes milliseconds.
    for loaded in [module for module in sys.modules if module.split(".")[0] == "diffusers_sr3"]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ImportError as error:
        failed.append(f"{name}: {error}")
assert not failed, failed
"""
    done = _python(code, heavy=())
    assert done.returncode == 0, done.stderr[-3000:]


def test_every_submodule_is_an_attribute_of_the_package():
    """`diffusers_sr3.backends.use_backend(...)` as README writes it: served on first use, as the eager import of
    every submodule would have bound them; other names stay missing, for Diffusers' getattr(library, name, None)."""
    code = """
import diffusers_sr3
assert "diffusers_sr3.redaction" not in sys.modules
assert callable(diffusers_sr3.redaction.redact) and callable(diffusers_sr3.backends.use_backend)
assert callable(diffusers_sr3.pretrained.default_model_path)
assert getattr(diffusers_sr3, "ModelMixin", None) is None and getattr(diffusers_sr3, "_private", None) is None
"""
    done = _python(code, heavy=())
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_pipeline_module_registers_the_remote_code_aliases_however_it_is_reached():
    code = """
import diffusers_sr3.pipelines.pipeline_sr3
for stem, name in [("unet_sr3", "SR3UNet2DModel"), ("pipeline_sr3", "SR3Pipeline"),
                   ("pipeline_sr3_cascade", "SR3CascadePipeline"),
                   ("pipeline_sr3_unconditional", "SR3UnconditionalPipeline")]:
    assert getattr(sys.modules[stem], name) is getattr(diffusers_sr3, name), stem
"""
    done = _python(code, heavy=())
    assert done.returncode == 0, done.stderr[-3000:]


def test_diffusers_takes_a_passed_unet_in_a_fresh_process(tmp_path, tiny_pipeline):
    """Diffusers checks a passed component against `sys.modules["unet_sr3"]`: the aliases must be registered by the
    time it does, though `import diffusers_sr3` no longer imports the pipelines."""
    tiny_pipeline.save_pretrained(tmp_path)
    code = f"""
from diffusers import DiffusionPipeline
from diffusers_sr3 import SR3UNet2DModel
unet = SR3UNet2DModel.from_pretrained({str(tmp_path / "unet")!r})
pipeline = DiffusionPipeline.from_pretrained({str(tmp_path)!r}, trust_remote_code=True, unet=unet)
assert pipeline.unet is unet and type(pipeline).__name__ == "SR3Pipeline"
"""
    done = _python(code, heavy=())
    assert done.returncode == 0, done.stderr[-3000:]


def test_ctrl_c_while_run_imports_torch_exits_130():
    code = """
from diffusers_sr3 import cli

class Interrupted:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt

sys.meta_path.insert(0, Interrupted())
assert cli.main(["upscale", "photo.png", "--output", "out"]) == 130
"""
    done = _python(code, heavy=())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == "sr3 upscale: interrupted\n"


def test_the_training_scripts_parse_without_torch():
    # Before, the training options imported the pipelines and the command line the trainer: 5 s to print --help.
    code = f"""
import contextlib, io, runpy
for script in ("train_sr3.py", "train_uncond.py"):
    for arguments, status in ((["--help"], 0), (["--no-such-option"], 2), (["--sampler", "nope"], 2)):
        sys.argv = [script, *arguments]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as errors:
            try:
                runpy.run_path({str(REPO / "examples")!r} + "/" + script, run_name="__main__")
            except SystemExit as leaving:
                assert leaving.code == status, (script, arguments, leaving.code, errors.getvalue())
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == []


def test_ctrl_c_while_a_training_script_imports_torch_exits_130(tmp_path):
    code = f"""
from diffusers_sr3.training import cli

class Interrupted:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt

sys.meta_path.insert(0, Interrupted())
arguments = ["--train_data_dir", {str(tmp_path)!r}, "--output_dir", {str(tmp_path / "out")!r}]
assert cli.main(arguments, prog="train_sr3.py") == 130
"""
    done = _python(code, heavy=())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == "train_sr3.py: interrupted\n"


def test_the_parsers_show_the_figures_of_the_modules_that_use_them():
    from diffusers_sr3 import backends, defaults, noise, tiling
    from diffusers_sr3.commands import common, prepare
    from diffusers_sr3.pipelines import base, pipeline_sr3

    assert backends.BACKENDS is defaults.BACKENDS and tiling.DEFAULT_MAX_TILE_PIXELS is defaults.DEFAULT_MAX_TILE_PIXELS
    assert pipeline_sr3.evaluations_per_crop is defaults.evaluations_per_crop
    assert base.steps_to_run is defaults.steps_to_run
    assert pipeline_sr3.SAMPLING_CONFIG_KEYS is defaults.SAMPLING_CONFIG_KEYS
    assert sorted(noise.SCHEDULERS) == sorted(defaults.SCHEDULER_CLASS_NAMES)
    assert {name: str(dtype) for name, dtype in common.DTYPES.items()} == {
        name: f"torch.{dtype}" for name, dtype in defaults.DTYPE_NAMES.items()
    }
    assert common.find_images.__module__ == "diffusers_sr3.image_io"  # re-exported, as before
    from torchvision.transforms import InterpolationMode

    assert [InterpolationMode(name).name for name in prepare.RESAMPLE] == ["BICUBIC", "BILINEAR", "LANCZOS", "NEAREST"]
    parser = cli.build_parser()
    assert parser.parse_args(["upscale", "a.png", "--output", "o"]).max_tile_pixels == tiling.DEFAULT_MAX_TILE_PIXELS


def test_the_startup_benchmark_prints_the_median_of_each_command(monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_startup", REPO / "benchmarks" / "startup.py")
    startup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(startup)
    timed = startup.commands()
    assert list(timed) == [
        "sr3 --help",
        "sr3 upscale --help",
        'python -c "import diffusers_sr3"',
        "python examples/train_sr3.py --help",
        'python -c "import torch" (reference)',
    ]
    # torch's own start-up, only a reference, is left out here: seconds.
    monkeypatch.setattr(startup, "commands", lambda: {label: timed[label] for label in list(timed)[:4]})
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    medians = startup.main(["--runs", "1"])
    printed = capsys.readouterr().out
    assert list(medians) == list(timed)[:4] and all(seconds > 0 for seconds in medians.values())
    assert f"diffusers_sr3 from {REPO / 'src' / 'diffusers_sr3' / '__init__.py'}" in printed
    assert "| `sr3 upscale --help` |" in printed
