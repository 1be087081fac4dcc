"""`sr3`'s error handling, common to every subcommand: one line and exit status 2 for errors of the input or the
system (OSError included), an out-of-memory hint, and 130 for Ctrl-C, also while the subcommands are imported."""

import errno
import json
import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch
from conftest import FIXTURES, tiny_unet_config

from diffusers_sr3 import SR3UnconditionalPipeline, SR3UNet2DModel, cli, make_scheduler
from diffusers_sr3.commands import prepare, upscale
from diffusers_sr3.commands.common import atomic_file, check_destinations
from diffusers_sr3.interrupts import Terminated, sigterm_as_interrupt


def _failing_run(error):
    def run(args):
        raise error

    return run


@pytest.mark.parametrize(
    "error, message",
    [
        (PermissionError(errno.EACCES, "Permission denied", "/data/out"), "[Errno 13] Permission denied: '/data/out'"),
        (OSError(errno.ENOSPC, "No space left on device"), "[Errno 28] No space left on device"),
        (OSError(errno.EROFS, "Read-only file system"), "[Errno 30] Read-only file system"),
        # Diffusers' error for a damaged model folder, over several lines: one line here
        (
            OSError("no file named model.bin\n  found in directory m."),
            "no file named model.bin found in directory m.",
        ),
    ],
)
def test_system_errors_are_one_line_and_exit_2(monkeypatch, capsys, error, message):
    monkeypatch.setattr(prepare, "run", _failing_run(error))
    assert cli.main(["prepare", "src", "--out", "out"]) == 2
    assert capsys.readouterr().err == f"sr3 prepare: error: {message}\n"


def test_a_damaged_model_folder_is_named_in_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config(in_channels=3, sample_size=16))
    SR3UnconditionalPipeline(unet, make_scheduler("ddpm", n_timestep=50)).save_pretrained(tmp_path / "model")
    for weights in (tmp_path / "model" / "unet").glob("diffusion_pytorch_model*"):
        weights.write_bytes(b"damaged")
    arguments = ["sample", "--model", str(tmp_path / "model"), "--output", str(tmp_path / "g.png"), "-n", "1"]
    assert cli.main(arguments + ["--steps", "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sr3 sample: error: ") and error.count("\n") == 1 and not (tmp_path / "g.png").exists()


def test_running_out_of_memory_names_the_remedy(monkeypatch, capsys):
    message = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes."
    monkeypatch.setattr(prepare, "run", _failing_run(RuntimeError(message)))
    assert cli.main(["prepare", "src", "--out", "out"]) == 2
    assert capsys.readouterr().err == f"sr3 prepare: error: out of memory; use smaller images ({message})\n"
    monkeypatch.setattr(prepare, "run", _failing_run(torch.cuda.OutOfMemoryError("CUDA out of memory.")))
    assert cli.main(["prepare", "src", "--out", "out"]) == 2
    assert "out of memory; use smaller images (CUDA out of memory.)" in capsys.readouterr().err
    monkeypatch.setattr(prepare, "run", _failing_run(MemoryError()))  # Python's, numpy's or Pillow's allocations
    assert cli.main(["prepare", "src", "--out", "out"]) == 2
    assert "sr3 prepare: error: out of memory; use smaller images" in capsys.readouterr().err
    monkeypatch.setattr(prepare, "run", _failing_run(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # other errors keep their traceback
        cli.main(["prepare", "src", "--out", "out"])
    # sr3 upscale's memory is its tile budget's activations plus the full-size images, which no tile option lowers.
    monkeypatch.setattr(upscale, "run", _failing_run(RuntimeError("CUDA out of memory.")))
    assert cli.main(["upscale", "photo.png", "--output", "out"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "about 140 bytes per output pixel whatever the tiles" in error
    assert "upscale smaller images; --max-tile-pixels lowers the network's activations" in error
    assert cli.main(["upscale", "photo.png", "--output", "out", "--batch-size", "4"]) == 2
    assert "upscale one image at a time (--batch-size 1) or smaller images" in capsys.readouterr().err


def _upscale_model(tmp_path, tiny_pipeline, **unet_overrides):
    """A small image and a saved tiny pipeline, its unet's config.json changed by `unet_overrides`."""
    from PIL import Image

    tiny_pipeline.save_pretrained(tmp_path / "model")
    config_file = tmp_path / "model" / "unet" / "config.json"
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text(encoding="utf-8")), **unet_overrides}), encoding="utf-8"
    )
    Image.new("RGB", (8, 8), "gray").save(tmp_path / "small.png")
    return ["upscale", str(tmp_path / "small.png"), "--model", str(tmp_path / "model"), "--output", str(tmp_path / "o")]


def test_a_model_config_of_absurd_size_is_refused_in_one_line(tmp_path, tiny_pipeline, capsys):
    assert cli.main(_upscale_model(tmp_path, tiny_pipeline, block_out_channels=1000000) + ["--steps", "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sr3 upscale: error: block_out_channels=1000000, ") and error.count("\n") == 1, error
    assert "over the 20 billion any SR3 model may have" in error and "out of memory" not in error


def test_running_out_of_memory_while_loading_the_model_names_the_model(tmp_path, tiny_pipeline, monkeypatch, capsys):
    from diffusers_sr3.pipelines import SR3BasePipeline

    arguments = _upscale_model(tmp_path, tiny_pipeline) + ["--steps", "1", "--no-memory-check"]
    for error in (RuntimeError("CUDA out of memory. Tried to allocate 16.00 TiB"), MemoryError()):

        def failing_load(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(SR3BasePipeline, "from_pretrained", failing_load)
        assert cli.main(arguments) == 2
        message = capsys.readouterr().err
        assert message.startswith(f"sr3 upscale: error: {tmp_path / 'model'} needs more memory than there is"), message
        assert "smaller images" not in message and "()" not in message and message.count("\n") == 1


def test_ctrl_c_exits_130_while_starting_and_while_running(monkeypatch, capsys):
    monkeypatch.setattr(prepare, "run", _failing_run(KeyboardInterrupt()))
    assert cli.main(["prepare", "src", "--out", "out"]) == 130
    assert capsys.readouterr().err == "sr3 prepare: interrupted\n"

    def interrupted_import(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted_import)  # Ctrl-C while torch is imported
    assert cli.main(["prepare", "src", "--out", "out"]) == 130
    assert capsys.readouterr().err == "sr3: interrupted\n"


def test_main_runs_outside_the_main_thread_without_a_sigterm_handler(monkeypatch, capsys):
    """Signal handlers can be set in the main thread only: elsewhere main runs without its SIGTERM handler."""
    monkeypatch.setattr(prepare, "run", _failing_run(ValueError("bad input")))
    before = signal.getsignal(signal.SIGTERM)
    statuses = []
    thread = threading.Thread(target=lambda: statuses.append(cli.main(["prepare", "src", "--out", "out"])))
    thread.start()
    thread.join()
    assert statuses == [2] and capsys.readouterr().err == "sr3 prepare: error: bad input\n"
    assert signal.getsignal(signal.SIGTERM) is before


def _wait_for_sigterm(ready):
    ready.set()
    time.sleep(30)


def test_a_process_forked_under_the_sigterm_handler_ends_on_sigterm_as_by_default():
    """`sr3 prepare`'s pool stops its workers with SIGTERM: a worker forked while `main` holds SIGTERM must end,
    not raise the interrupt inside the pool's queue (tracebacks, or a pool waiting on a worker forever)."""
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    with sigterm_as_interrupt():
        worker = context.Process(target=_wait_for_sigterm, args=(ready,))
        worker.start()
        assert ready.wait(10)
        worker.terminate()
        # Polled with waitpid, not joined: join waits for the worker's sentinel pipe to close, and a process forked
        # meanwhile by any other thread of the test run holds it open after the worker ended (once in CI, a join of
        # 10 s found the worker unfinished).
        deadline = time.monotonic() + 20
        while worker.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.exitcode == -signal.SIGTERM
        with pytest.raises(Terminated):  # in the process that holds it, SIGTERM is the interrupt
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)


def test_a_process_forked_under_the_sigterm_handler_starts_with_sigterms_default():
    """Not the handler: a Python-level handler runs only when the worker next runs bytecode, so a SIGTERM arriving just
    before it blocks in C (a pool queue's semaphore) went unhandled, and `sr3 prepare` waited on that worker forever."""
    with sigterm_as_interrupt():
        child = os.fork()
        if child == 0:
            os._exit(0 if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else 1)
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_full_disk_while_saving_weights_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    arguments = ["convert", "--checkpoint", str(FIXTURES / "sr3_tiny_I10_E1_gen.pth")]
    arguments += ["--config", str(FIXTURES / "sr3_tiny_config.json"), "--output", str(tmp_path / "pipeline")]
    assert cli.main(arguments) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"sr3 convert: error: cannot write the converted pipeline in {tmp_path / 'pipeline'}: Error while serializing: "
        "I/O error: No space left on device (os error 28)"
    )
    # Other errors of a kind the command line does not expect keep their traceback.
    monkeypatch.setattr(prepare, "run", _failing_run(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["prepare", "src", "--out", "out"])


def test_atomic_file_names_the_destination_of_an_error_that_names_no_file(tmp_path):
    destination = tmp_path / "metrics.json"
    with pytest.raises(OSError) as raised:
        with atomic_file(str(destination)) as stream:
            stream.write(b"{")
            raise OSError(errno.ENOSPC, "No space left on device")  # as json or Pillow writing to the stream
    assert raised.value.errno == errno.ENOSPC
    assert str(raised.value) == f"[Errno 28] cannot write {destination}: No space left on device"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PermissionError) as raised:  # one that names its file is left as it is
        with atomic_file(str(destination)):
            raise PermissionError(errno.EACCES, "Permission denied", "/elsewhere")
    assert raised.value.filename == "/elsewhere" and list(tmp_path.iterdir()) == []


def test_destinations_differing_only_in_case_are_refused_on_every_platform(tmp_path):
    # `sr3 sample` and `sr3 upscale` check their writes here: one file on macOS and Windows filesystems.
    writes = [("the grid", str(tmp_path / "Grid.png")), ("the process strip", str(tmp_path / "grid.PNG"))]
    with pytest.raises(ValueError) as raised:
        check_destinations(writes, overwrite=True)
    assert str(raised.value) == (
        f"the grid and the process strip would be written to {tmp_path / 'Grid.png'} and {tmp_path / 'grid.PNG'}, "
        "one file on case-insensitive filesystems (macOS, Windows); write them into separate --output folders"
    )
    check_destinations(writes[:1] + [("another", str(tmp_path / "grid-2.png"))], overwrite=False)
    # Case, not full Unicode case folding: those file systems keep ß and ss apart.
    check_destinations([("a", str(tmp_path / "straße.png")), ("b", str(tmp_path / "strasse.png"))], overwrite=False)


@pytest.mark.parametrize("backend", ["bf16", "onnx"])
def test_a_float32_backend_with_another_dtype_is_refused_before_the_model_loads(monkeypatch, capsys, backend):
    def load_pipeline(*args, **kwargs):
        raise AssertionError("the options were checked after loading the model")

    monkeypatch.setattr(upscale, "load_pipeline", load_pipeline)
    arguments = ["upscale", "photo.png", "--output", "out.png", "--backend", backend, "--dtype", "bf16"]
    assert cli.main(arguments) == 2
    assert capsys.readouterr().err == (
        f"sr3 upscale: error: --backend {backend} runs "
        + ("a float32 model under bfloat16 autocast" if backend == "bf16" else "the model in float32")
        + ": use --dtype float32, or --backend torch\n"
    )


def test_an_unknown_option_is_named_by_its_subcommand(capsys):
    """It printed the top-level usage and `sr3: error:`, unlike every other error of a subcommand."""
    with pytest.raises(SystemExit) as leaving:
        cli.main(["upscale", "photo.png", "--output", "out", "--bogus"])
    assert leaving.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: sr3 upscale ") and error.endswith(
        "sr3 upscale: error: unrecognized arguments: --bogus\n"
    )
