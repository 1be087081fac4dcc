"""Writes that fail (a full disk, a read-only folder) leave the earlier file as it was, no temporary, and an error
naming the file: results, reports, model cards, the training run's final files and the demo's model."""

import builtins
import errno
import json
import os

import PIL.Image
import pytest
from test_data import make_image_folder
from test_training import SR_SCRIPT, as_argv, fast_options, run_script

from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel
from diffusers_sr3.cli import main
from diffusers_sr3.commands import common
from diffusers_sr3.file_writes import atomic_file
from diffusers_sr3.model_card import write_model_card
from diffusers_sr3.noise import make_scheduler


class _FullDisk:
    """A file whose write stores half of the data, then fails as a full disk does."""

    def __init__(self, handle, code):
        self._handle, self._code = handle, code

    def write(self, data):
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        raise OSError(self._code, os.strerror(self._code))

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def _fill_disk(monkeypatch, folder, first_data, code=errno.ENOSPC):
    """Make writes into `folder` whose first data `first_data` accepts fail with `code` (a full disk: ENOSPC; a file
    size limit, `ulimit -f`: EFBIG); other opens are left as they are."""
    real_open = builtins.open

    def opening(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if not any(flag in mode for flag in "wxa") or not os.path.abspath(str(file)).startswith(str(folder)):
            return handle

        class Writer(_FullDisk):
            def write(self, data):
                if first_data(data if isinstance(data, bytes) else data.encode()):
                    return super().write(data)
                return self._handle.write(data)

        return Writer(handle, code)

    monkeypatch.setattr(builtins, "open", opening)


def _listing(folder):
    """`folder`'s entries, sorted, without the output folder's training lock (which stays by design)."""
    from diffusers_sr3.training.output_lock import LOCK_FILE

    return sorted(name for name in os.listdir(folder) if name != LOCK_FILE)


def _leftovers(folder):
    """Hidden files a write left behind: not the output folder's training lock, which stays by design."""
    from diffusers_sr3.training.output_lock import LOCK_FILE

    return [name for name in os.listdir(folder) if name.startswith(".sr3-") and name != LOCK_FILE]


def test_an_unwritable_folder_names_the_destination_not_the_temporary(tmp_path, monkeypatch):
    destination = tmp_path / "out.png"
    destination.write_bytes(b"earlier")
    real_open = builtins.open

    def read_only(file, mode="r", *args, **kwargs):
        if "x" in mode:
            raise OSError(errno.EROFS, "Read-only file system", file)
        return real_open(file, mode, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", read_only)
        with pytest.raises(OSError) as raised:
            with atomic_file(str(destination)):
                pass
    assert raised.value.errno == errno.EROFS
    assert str(raised.value) == f"[Errno 30] cannot write {destination}: Read-only file system"

    def refused(source, target):
        raise PermissionError(errno.EACCES, "Permission denied", source, None, target)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(PermissionError, match=rf"^\[Errno 13\] cannot write {destination}: Permission denied$"):
        with atomic_file(str(destination)) as stream:
            stream.write(b"new")
    assert destination.read_bytes() == b"earlier" and _leftovers(tmp_path) == []
    # The old name still imports it.
    assert common.atomic_file is atomic_file


def test_a_full_disk_keeps_the_earlier_model_card(tmp_path, monkeypatch):
    path = write_model_card(str(tmp_path), task="sr", upscale_factor=4, resolution=64, data_description="x")
    earlier = open(path, "rb").read()
    _fill_disk(monkeypatch, tmp_path, lambda data: data.startswith(b"---"))
    with pytest.raises(OSError, match=rf"^\[Errno 28\] cannot write {path}: No space left on device$"):
        write_model_card(str(tmp_path), task="sr", upscale_factor=4, resolution=64, data_description="y" * 2000)
    monkeypatch.undo()
    assert open(path, "rb").read() == earlier and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "name, first_data, code",
    [
        ("validation.png", lambda data: data.startswith(b"\x89PNG"), errno.EFBIG),
        ("README.md", lambda data: data.startswith(b"---"), errno.ENOSPC),
        ("training_summary.json", lambda data: b'"global_step"' in data, errno.ENOSPC),
    ],
)
def test_a_full_disk_at_the_final_save_keeps_the_earlier_files_and_names_the_one(
    tmp_path, monkeypatch, capsys, name, first_data, code
):
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    output = tmp_path / "out"
    output.mkdir()
    (output / name).write_bytes(b"the earlier run's")
    options = fast_options(output, train_data_dir=data, max_train_steps=1)
    _fill_disk(monkeypatch, output, first_data, code)
    assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 2
    err = capsys.readouterr().err
    assert f"cannot write the trained pipeline in {output} (" in err, err
    assert f"cannot write {output / name}: {os.strerror(code)}" in err, err
    assert "Traceback" not in err
    assert (output / name).read_bytes() == b"the earlier run's" and _leftovers(output) == []


def _quick_training(train_crops, config, args, model_dir, bfloat16, sampling):
    """The demo's `_train`, without training: the untrained tiny model, saved as the demo saves it."""
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample")
    SR3Pipeline(SR3UNet2DModel(**config), scheduler, upscale_factor=4).save_pretrained(model_dir)
    return 1, None


def _earlier_demo(out):
    (out / "model" / "checkpoint-5").mkdir(parents=True)
    (out / "model" / "model_index.json").write_text("the earlier model", encoding="utf-8")
    (out / "metrics.json").write_text("the earlier report", encoding="utf-8")
    (out / "comparison.png").write_bytes(b"the earlier picture")


DEMO = ["--steps", "1", "--width", "8", "--crop-size", "32", "--train-crops", "4", "--eval-crops", "1"]
DEMO += ["--inference-steps", "2", "--photo-size", "32", "--no-packaged", "--batch-size", "2", "--overwrite"]


def test_a_demo_rerun_that_fails_keeps_the_earlier_model_and_report(tmp_path, monkeypatch, capsys):
    from diffusers_sr3.commands import demo

    out = tmp_path / "demo"
    _earlier_demo(out)
    monkeypatch.setattr(demo, "_train", _quick_training)
    _fill_disk(monkeypatch, out, lambda data: b'"per_image"' in data)  # metrics.json, written last
    assert main(["demo", "--output", str(out), *DEMO]) == 2
    monkeypatch.undo()
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"sr3 demo: error: [Errno 28] cannot write {out / 'metrics.json'}: No space left on device"
    )
    assert (out / "model" / "model_index.json").read_text(encoding="utf-8") == "the earlier model"
    assert (out / "model" / "checkpoint-5").is_dir() and len(_listing(out / "model")) == 2
    assert (out / "metrics.json").read_text(encoding="utf-8") == "the earlier report"
    assert (out / "comparison.png").read_bytes() == b"the earlier picture"
    assert _listing(out) == ["comparison.png", "metrics.json", "model"]


def test_a_demo_rerun_that_succeeds_leaves_nothing_of_the_earlier_model(tmp_path, monkeypatch, capsys):
    from diffusers_sr3.commands import demo

    out = tmp_path / "demo"
    _earlier_demo(out)
    monkeypatch.setattr(demo, "_train", _quick_training)
    assert main(["demo", "--output", str(out), *DEMO]) == 0
    assert f"removed the earlier demo's model in {out / 'model'}" in capsys.readouterr().out
    assert not (out / "model" / "checkpoint-5").exists()
    assert (
        json.loads((out / "model" / "model_index.json").read_text(encoding="utf-8"))["_class_name"][-1] == "SR3Pipeline"
    )
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["steps"] == 1
    assert PIL.Image.open(out / "comparison.png").size[1] == 64
    assert _listing(out) == ["comparison.png", "metrics.json", "metrics.md", "model", "photo.png"]


def test_upscale_refuses_an_unwritable_output_before_the_model_runs(tmp_path, monkeypatch, capsys):
    from diffusers_sr3.commands import upscale

    source = tmp_path / "in.png"
    PIL.Image.new("RGB", (8, 8)).save(source)
    blocking = tmp_path / "in2.png"
    blocking.write_bytes(b"a file")
    monkeypatch.setattr(upscale, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model first"))
    assert main(["upscale", str(source), "--output", str(blocking / "x.png"), "--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"sr3 upscale: error: --output {blocking / 'x.png'} cannot be written: {blocking} is a file, not a folder"
    )
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).endswith("ro"))  # a read-only mount
    assert main(["upscale", str(source), "--output", str(tmp_path / "ro" / "out.png"), "--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"sr3 upscale: error: --output {tmp_path / 'ro' / 'out.png'} cannot be written: {tmp_path / 'ro'} is not a "
        "writable folder"
    )
    # Written past the check (another program made the file meanwhile), the file in the way is named too.
    with pytest.raises(NotADirectoryError, match=f"^cannot write {blocking / 'y' / 'x.png'}: {blocking} is a file"):
        upscale.save_atomically(PIL.Image.new("RGB", (4, 4)), str(blocking / "y" / "x.png"))


def test_a_dangling_link_where_a_folder_should_be_is_named_before_the_model_runs(tmp_path, monkeypatch, capsys):
    from diffusers_sr3.commands import sample, upscale

    source = tmp_path / "in.png"
    PIL.Image.new("RGB", (8, 8)).save(source)
    (tmp_path / "results").symlink_to(tmp_path / "nowhere")
    monkeypatch.setattr(upscale, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model first"))
    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model first"))
    monkeypatch.chdir(tmp_path)
    for command, name in (("upscale", "in_sr.png"), ("sample", "grid.png")):
        output = os.path.join("results", name)  # relative: the walk up once never ended
        arguments = [command, *([str(source)] if command == "upscale" else []), "--output", output]
        assert main([*arguments, "--model", str(tmp_path)]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"sr3 {command}: error: --output {output} cannot be written: {tmp_path / 'results'} is a link to nothing"
        )
    # Written past the check (the link made meanwhile), the link is named, not the folder above it.
    for destination in ("results/in_sr.png", str(tmp_path / "results" / "deeper" / "in_sr.png")):
        with pytest.raises(NotADirectoryError, match=f"^cannot write {destination}: {tmp_path / 'results'} is a link"):
            upscale.save_atomically(PIL.Image.new("RGB", (4, 4)), destination)
    # Nothing in the way (a folder another run made meanwhile): makedirs' own error, not a made-up blocker.
    (tmp_path / "made").mkdir()

    def made_meanwhile(folder, exist_ok=False):
        raise FileExistsError(errno.EEXIST, "File exists", folder)

    monkeypatch.setattr(os, "makedirs", made_meanwhile)
    with pytest.raises(FileExistsError, match=r"^\[Errno 17\] File exists: 'made'$"):
        upscale.save_atomically(PIL.Image.new("RGB", (4, 4)), os.path.join("made", "x.png"))


def test_errors_naming_another_file_pass_through_and_errors_naming_none_name_the_destination(tmp_path):
    outer, inner = tmp_path / "outer.json", tmp_path / "inner.png"
    inner.write_bytes(b"another run's")
    with pytest.raises(FileExistsError, match=f"^{inner} already exists; pass --overwrite"):
        with atomic_file(str(outer)):
            with atomic_file(str(inner), overwrite=False) as stream:
                stream.write(b"new")
    # An input that cannot be read names itself, and stays the input's error.
    with pytest.raises(FileNotFoundError, match="missing.png"):
        with atomic_file(str(tmp_path / "out.png")) as stream:
            PIL.Image.open(tmp_path / "missing.png").save(stream, format="PNG")
    # Pillow's refusal of a mode the format cannot hold has no errno and no name: it is the output's.
    with pytest.raises(OSError, match=f"^cannot write {tmp_path / 'out.jpg'}: cannot write mode I;16 as JPEG"):
        with atomic_file(str(tmp_path / "out.jpg")) as stream:
            PIL.Image.new("I;16", (4, 4)).save(stream, format="JPEG")
    assert inner.read_bytes() == b"another run's" and not outer.exists() and _leftovers(tmp_path) == []


def test_a_symlinked_demo_model_is_refused_before_training(tmp_path, monkeypatch, capsys):
    from diffusers_sr3.commands import demo

    out = tmp_path / "demo"
    _earlier_demo(tmp_path / "elsewhere")
    out.mkdir()
    (out / "model").symlink_to(tmp_path / "elsewhere" / "model")
    monkeypatch.setattr(demo, "_train", lambda *a: pytest.fail("trained first"))
    assert main(["demo", "--output", str(out), *DEMO]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"sr3 demo: error: {out / 'model'} is a symbolic link; sr3 demo writes its model into a folder of its own: "
        "remove the link (what it points to is kept) or choose another --output"
    )
    assert (
        _listing(out) == ["model"]
        and (out / "model" / "model_index.json").read_text(encoding="utf-8") == "the earlier model"
    )


def test_a_demo_rerun_that_succeeds_warns_when_the_earlier_model_cannot_be_removed(tmp_path, monkeypatch, capsys):
    import shutil

    from diffusers_sr3.commands import demo

    out = tmp_path / "demo"
    _earlier_demo(out)
    monkeypatch.setattr(demo, "_train", _quick_training)
    real_rmtree = shutil.rmtree

    def refused(path, *args, **kwargs):
        if ".sr3-earlier-model-" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", refused)
    assert main(["demo", "--output", str(out), *DEMO]) == 0
    (left,) = [name for name in os.listdir(out) if name.startswith(".sr3-earlier-model-")]
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith(
            f"warning: could not remove the earlier demo's model, left in {out / left}: [Errno 13] Permission denied"
        )
    )
    assert (out / left / "model_index.json").read_text(encoding="utf-8") == "the earlier model"
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["steps"] == 1


@pytest.mark.parametrize("moving", ["the new photo.png in place", "the earlier photo.png aside"])
def test_a_demo_rerun_that_fails_putting_its_report_in_place_keeps_the_earlier_report(
    tmp_path, monkeypatch, capsys, moving
):
    from diffusers_sr3.commands import demo

    out = tmp_path / "demo"
    _earlier_demo(out)
    (out / "photo.png").write_bytes(b"the earlier photo")
    monkeypatch.setattr(demo, "_train", _quick_training)
    real_replace = os.replace
    new = moving.startswith("the new")

    def photo_open_in_a_viewer(source, target, **kwargs):  # Windows: neither replaced nor moved
        if str(target if new else source).endswith("photo.png") and str(source).endswith(".tmp") == new:
            raise PermissionError(errno.EACCES, "Permission denied", source, None, target)
        return real_replace(source, target, **kwargs)

    monkeypatch.setattr(os, "replace", photo_open_in_a_viewer)
    assert main(["demo", "--output", str(out), *DEMO]) == 2
    monkeypatch.undo()
    error = capsys.readouterr().err.splitlines()[-1]
    if new:
        assert error == f"sr3 demo: error: [Errno 13] cannot write {out / 'photo.png'}: Permission denied"
    else:
        assert error.startswith(f"sr3 demo: error: [Errno 13] Permission denied: '{out / 'photo.png'}' -> ")
    assert (out / "metrics.json").read_text(encoding="utf-8") == "the earlier report"
    assert (out / "comparison.png").read_bytes() == b"the earlier picture"
    assert (out / "photo.png").read_bytes() == b"the earlier photo"
    assert (out / "model" / "model_index.json").read_text(encoding="utf-8") == "the earlier model"
    assert _listing(out) == ["comparison.png", "metrics.json", "model", "photo.png"]  # no metrics.md


def test_a_demo_names_the_model_a_killed_rerun_set_aside_and_leaves_it(tmp_path, monkeypatch, capsys):
    from diffusers_sr3.commands import demo

    out = tmp_path / "demo"
    (out / ".sr3-earlier-model-0123456789ab" / "checkpoint-9").mkdir(parents=True)
    monkeypatch.setattr(demo, "_train", _quick_training)
    assert main(["demo", "--output", str(out), *DEMO]) == 0
    aside = out / ".sr3-earlier-model-0123456789ab"
    # A note, on stderr with the others: stdout says what the demo did.
    captured = capsys.readouterr()
    assert (
        f"note: {aside}: the model of an earlier demo, set aside while a rerun trained and left there when that run "
        f"was killed; rename it to {out / 'model'} to get it back"
    ) in captured.err.splitlines()
    assert "note:" not in captured.out
    assert (aside / "checkpoint-9").is_dir()
