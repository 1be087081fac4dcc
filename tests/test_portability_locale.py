"""Portability: file names a console cannot encode, paths on two Windows drives, and min-SNR weights on devices
without float64 (Apple's MPS)."""

import argparse
import io
import json
import ntpath
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import REPO
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from diffusers_sr3.cli import main, printable_file_names
from diffusers_sr3.commands import eval as eval_command
from diffusers_sr3.commands import prepare
from diffusers_sr3.training import TrainingConfig
from diffusers_sr3.training import cli as training_cli
from diffusers_sr3.training.config import training_command
from diffusers_sr3.training.objective import min_snr_weights

# Neither is in cp1252, the encoding of Windows' redirected output.
CAT, DOG = "猫", "犬"


def write_image(path, size, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def sr3_in_cp1252(*arguments, cwd):
    """`sr3 <arguments>` in a fresh interpreter whose stdout and stderr are cp1252, as on Windows redirected."""
    env = {
        **os.environ,
        "PYTHONIOENCODING": "cp1252",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "diffusers_sr3", *map(str, arguments)]
    return subprocess.run(command, capture_output=True, env=env, cwd=cwd, timeout=120)


def _strict_console(encoding, errors="strict"):
    """A stream as Python makes sys.stdout for a console or redirected output in `encoding` (PYTHONIOENCODING)."""
    return io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors=errors, write_through=True)


def cp1252_console(monkeypatch):
    """Make sys.stdout and sys.stderr as on Windows with redirected output (cp1252; strict, and backslashreplace for
    stderr as Python makes it); returns stdout. Called in the test itself: pytest sets its own capture again between
    a fixture and the test."""
    out = _strict_console("cp1252")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", _strict_console("cp1252", errors="backslashreplace"))  # Python's for stderr
    return out


def test_a_rerun_of_prepare_in_a_cp1252_interpreter_prints_the_name_it_lacks(tmp_path):
    """In a real interpreter's streams (a rerun finds the dataset complete before torch loads: fast); the tests
    below run whole commands in such streams made in-process."""
    write_image(tmp_path / "photos" / f"{CAT}.png", 40)
    arguments = ["prepare", "photos", "--out", "準備", "--sizes", "8,32", "--n_worker", "0"]
    assert main([arguments[0], str(tmp_path / "photos"), "--out", str(tmp_path / "準備"), *arguments[4:]]) == 0
    done = sr3_in_cp1252(*arguments, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode("cp1252")
    assert done.stdout.decode("cp1252").startswith("\\u6e96\\u5099 is already complete: 1 images")  # 準備


def test_prepare_finishes_and_reruns_with_names_the_console_cannot_print(tmp_path, monkeypatch):
    console = cp1252_console(monkeypatch)
    for seed, name in enumerate((CAT, DOG)):
        write_image(tmp_path / "photos" / f"{name}.png", 40, seed)
    arguments = ["prepare", str(tmp_path / "photos"), "--out", str(tmp_path / "準備"), "--sizes", "8,32"]
    for _ in range(2):  # the run, then a rerun that finds it complete
        assert main([*arguments, "--n_worker", "0"]) == 0
    assert "is already complete: 2 images" in console.buffer.getvalue().decode("cp1252")


def test_upscale_goes_on_past_names_the_console_cannot_print(tiny_pipeline, tmp_path, monkeypatch):
    console = cp1252_console(monkeypatch)
    tiny_pipeline.save_pretrained(tmp_path / "model")
    for seed, name in enumerate((CAT, DOG)):
        write_image(tmp_path / "photos" / f"{name}.png", 8, seed)
    out = tmp_path / "out"
    arguments = ["upscale", str(tmp_path / "photos"), "--output", str(out), "--model", str(tmp_path / "model")]
    assert main([*arguments, "--steps", "1"]) == 0
    assert sorted(path.name for path in out.iterdir()) == sorted([f"{CAT}_sr.png", f"{DOG}_sr.png"])
    assert "\\u732b.png -> " in console.buffer.getvalue().decode("cp1252")  # 猫, escaped


def test_eval_writes_its_json_report_with_names_the_console_cannot_print(tmp_path, monkeypatch):
    console = cp1252_console(monkeypatch)
    for seed, name in enumerate((CAT, "dog")):
        write_image(tmp_path / "hr" / f"{name}.png", 16, seed)
        write_image(tmp_path / "sr" / f"{name}.png", 16, seed + 10)
    report = tmp_path / "report.json"
    assert main(["eval", "--hr", str(tmp_path / "hr"), "--sr", str(tmp_path / "sr"), "--json", str(report)]) == 0
    assert set(json.loads(report.read_text(encoding="utf-8"))["images"]) == {CAT, "dog"}
    assert "\\u732b" in console.buffer.getvalue().decode("cp1252")


def test_eval_writes_the_json_report_before_printing(tmp_path, monkeypatch):
    for name in ("a", "b"):
        write_image(tmp_path / "hr" / f"{name}.png", 16)
        write_image(tmp_path / "sr" / f"{name}.png", 16, 1)

    def broken_console(*args, **kwargs):
        raise BrokenPipeError("the console went away")

    monkeypatch.setattr("builtins.print", broken_console)
    arguments = ["--hr", str(tmp_path / "hr"), "--sr", str(tmp_path / "sr"), "--json", str(tmp_path / "r.json")]
    parser = argparse.ArgumentParser()
    eval_command.add_arguments(parser)
    with pytest.raises(BrokenPipeError):
        eval_command.run(parser.parse_args(arguments))
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["count"] == 2


def test_printable_file_names_escapes_for_the_block_and_restores_the_streams(monkeypatch):
    out, err = _strict_console("cp1252"), _strict_console("utf-8")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    with printable_file_names():
        print(f"{CAT}.png café", flush=True)
        print("caf\udce9.png", file=sys.stderr, flush=True)  # an undecodable byte, as os.listdir keeps it
    assert out.buffer.getvalue() == "\\u732b.png café\n".encode("cp1252")
    assert err.buffer.getvalue() == b"caf\\udce9.png\n"
    assert (out.encoding, out.errors, err.errors) == ("cp1252", "strict", "strict")
    # A POSIX locale's stdout writes the name's own byte, which is better than an escape: left as it is.
    posix = _strict_console("utf-8", errors="surrogateescape")
    monkeypatch.setattr(sys, "stdout", posix)
    with printable_file_names():
        print("caf\udce9.png", flush=True)
    assert posix.buffer.getvalue() == b"caf\xe9.png\n"


def test_the_training_scripts_print_paths_the_console_cannot_encode(tmp_path, monkeypatch):
    from diffusers_sr3.training import trainer

    console = cp1252_console(monkeypatch)
    # The summary that ends a run names its output folder.
    monkeypatch.setattr(trainer, "train", lambda config: print(f"pipeline saved to {config.output_dir}"))
    write_image(tmp_path / "photos" / "a.png", 40)
    output = tmp_path / f"{CAT}_run"
    arguments = ["--train_data_dir", str(tmp_path / "photos"), "--output_dir", str(output), "--preset", "tiny"]
    assert training_cli.main(arguments, prog="train_sr3.py") == 0
    assert console.buffer.getvalue().decode("cp1252").endswith("\\u732b_run\n")
    assert console.errors == "strict"


def _other_drive_relpath(path, start=os.curdir):
    """os.path.relpath as Windows answers for a path on D: seen from a working folder on C:."""
    return ntpath.relpath(path, "C:\\work" if start == os.curdir else start)


def test_the_training_command_keeps_a_script_on_another_drive_as_given(monkeypatch):
    monkeypatch.setattr(os.path, "relpath", _other_drive_relpath)
    command = training_command(TrainingConfig(), argv=["D:\\sr3\\train_sr3.py", "--seed", "3"])
    assert command == "accelerate launch 'D:\\sr3\\train_sr3.py' --seed 3"


def test_prepare_reads_every_source_when_the_output_is_on_another_drive(tmp_path, monkeypatch):
    for name in ("a", "b"):
        write_image(tmp_path / "photos" / f"{name}.png", 8)

    def commonpath(paths):  # as ntpath answers for C:\... and D:\...
        return ntpath.commonpath(["C:\\photos", "D:\\out"])

    monkeypatch.setattr(os.path, "commonpath", commonpath)
    assert prepare.source_files(str(tmp_path / "photos"), output=str(tmp_path / "out")) == ["a.png", "b.png"]


def test_eval_leaves_out_no_folder_on_another_drive(tmp_path, monkeypatch):
    real_relpath = os.path.relpath

    def relpath(path, start=os.curdir):
        if "other_drive" in path:
            return ntpath.relpath("D:\\sr", "C:\\hr")
        return real_relpath(path, start)

    monkeypatch.setattr(os.path, "relpath", relpath)
    hr = tmp_path / "hr"
    others = [str(tmp_path / "other_drive"), str(hr / "sr")]
    assert eval_command._inner_folders(str(hr), others) == ["sr" + os.sep]


def _min_snr_weights_as_before(noise_level, prediction_type, snr_gamma):
    alpha_bar = noise_level.double() ** 2
    snr = alpha_bar / (1 - alpha_bar).clamp(min=1e-12)
    clipped = snr.clamp(max=snr_gamma)
    weights = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1)}.get(prediction_type, clipped)
    return weights.float()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_are_unchanged_on_the_cpu(prediction_type):
    level = torch.cat([torch.rand(64, generator=torch.Generator().manual_seed(0)), torch.tensor([0.0, 1.0])])
    expected = _min_snr_weights_as_before(level, prediction_type, 5.0)
    torch.testing.assert_close(min_snr_weights(level, prediction_type, 5.0), expected, rtol=0, atol=0, equal_nan=True)


class _NoFloat64OffTheCpu(TorchDispatchMode):
    """Raises, as MPS does, where an operation makes a float64 tensor on another device than the CPU."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64 and tensor.device.type != "cpu":
                raise TypeError(f"Cannot convert a MPS Tensor to float64 dtype ({func})")
        return out


def test_min_snr_weights_make_no_float64_tensor_on_an_mps_device():
    with FakeTensorMode(allow_non_fake_inputs=True):
        level = torch.rand(4, device="mps")  # fake: no Apple GPU needed
        with _NoFloat64OffTheCpu():
            weights = min_snr_weights(level, "epsilon", 5.0)
    assert weights.device.type == "mps" and weights.dtype == torch.float32


def _text_calls_without_encoding(path):
    """`open`, `read_text` and `write_text` calls in one file that read or write text in the locale's encoding."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or any(keyword.arg == "encoding" for keyword in node.keywords):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if name in ("read_text", "write_text"):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}")
        elif name == "open" and isinstance(node.func, ast.Name):
            modes = [argument for argument in node.args[1:2]] + [k.value for k in node.keywords if k.arg == "mode"]
            binary = any(isinstance(mode, ast.Constant) and "b" in str(mode.value) for mode in modes)
            if not binary and not any(not isinstance(mode, ast.Constant) for mode in modes):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_every_text_file_is_read_and_written_as_utf_8():
    """Without `encoding=`, text is read in the locale's encoding: cp1252 on Windows, where the README's and the
    docs' UTF-8 (and a test's own non-ASCII strings) would come back garbled or fail to decode."""
    folders = ["src", "tests", "examples", "spaces", "benchmarks"]
    files = [path for folder in folders for path in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 100
    assert [call for path in files for call in _text_calls_without_encoding(path)] == []
