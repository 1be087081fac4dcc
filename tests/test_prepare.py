"""`sr3 prepare`: the original's layout and resizing, LMDB and parquet output, bad files, resuming, clobbering."""

import io
import json
import os
import shutil
import signal

import numpy as np
import PIL.Image
import pytest
from conftest import SAMPLES

from diffusers_sr3.cli import main
from diffusers_sr3.commands import prepare

PHOTOS = SAMPLES / "ffhq_64_512" / "hr_512"


def reference_resize(image, size):
    """The original's resize_and_convert, written out with PIL: shorter side to `size` (torchvision's rounding),
    bicubic, then the centre crop (torchvision's offsets)."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    image = image.resize(new, PIL.Image.BICUBIC)
    top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


@pytest.fixture
def source(tmp_path):
    """Two square photos, a wide and a tall crop in a subfolder, and an unreadable file (sorted: a, b, c, d, e)."""
    folder = tmp_path / "source"
    (folder / "sub").mkdir(parents=True)
    photos = sorted(PHOTOS.glob("*.png"))
    shutil.copy(photos[0], folder / "a.png")
    PIL.Image.open(photos[1]).convert("RGB").save(folder / "b.jpg", quality=95)
    PIL.Image.open(photos[2]).crop((0, 100, 512, 300)).save(folder / "sub" / "c.png")  # 512 x 200
    (folder / "sub" / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    PIL.Image.open(photos[3]).crop((50, 0, 250, 512)).save(folder / "sub" / "e.webp", lossless=True)  # 200 x 512
    (folder / "notes.txt").write_text("not an image", encoding="utf-8")
    return folder


def read(path):
    return np.asarray(PIL.Image.open(path).convert("RGB"))


def test_folder_layout_matches_the_original_resizing(source, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prepare", str(source), "--out", str(out), "--sizes", "16,128", "--n_worker", "0"]) == 0
    captured = capsys.readouterr()
    # A problem, told on stderr with the progress bar: stdout says what was written.
    assert "skipped unreadable" in captured.err and "sub/d.png" in captured.err
    assert captured.out.startswith("wrote 4 images") and "skipped 1 unreadable file(s)" in captured.out
    names = ["a.png", "b.jpg", "sub/c.png", "sub/e.webp"]  # readable files, sorted; d.png skipped
    for folder in ("lr_16", "hr_128", "sr_16_128"):
        assert sorted(p.name for p in (out / folder).iterdir()) == [f"{i:05d}.png" for i in range(4)]
    for index, name in enumerate(names):
        image = PIL.Image.open(source / name).convert("RGB")
        lr = reference_resize(image, 16)
        assert np.array_equal(read(out / "lr_16" / f"{index:05d}.png"), np.asarray(lr))
        assert np.array_equal(read(out / "hr_128" / f"{index:05d}.png"), np.asarray(reference_resize(image, 128)))
        # sr = the bicubic upsample of the LR image ("fake SR")
        assert np.array_equal(read(out / "sr_16_128" / f"{index:05d}.png"), np.asarray(reference_resize(lr, 128)))
    state = json.loads((out / ".sr3_prepare.json").read_text(encoding="utf-8"))
    assert state["complete"] and state["written"] == 4 and list(state["skipped"]) == ["sub/d.png"]
    # Running again finds it complete; worker processes give the same files.
    assert main(["prepare", str(source), "--out", str(out), "--sizes", "16,128"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["prepare", str(source), "--out", str(tmp_path / "workers"), "--n_worker", "2"]) == 0
    for path in out.glob("*/*.png"):
        assert path.read_bytes() == (tmp_path / "workers" / path.relative_to(out)).read_bytes()


def test_lmdb_in_the_original_format_and_read_by_the_training_data(source, tmp_path):
    import lmdb

    from diffusers_sr3.data import build_training_data

    out = tmp_path / "lmdb"
    assert main(["prepare", "--path", str(source), "--out", str(out), "--size", "16,64", "-l", "--n_worker", "0"]) == 0
    folder = tmp_path / "folder"
    assert main(["prepare", str(source), "--out", str(folder), "--sizes", "16,64", "--n_worker", "0"]) == 0
    with lmdb.open(str(out), readonly=True, lock=False) as environment, environment.begin() as transaction:
        keys = sorted(key.decode() for key, _ in transaction.cursor())
        assert transaction.get(b"length") == b"4"
        for index in range(4):
            for key, sub in ((f"hr_64_{index:05d}", "hr_64"), (f"sr_16_64_{index:05d}", "sr_16_64")):
                stored = np.asarray(PIL.Image.open(io.BytesIO(transaction.get(key.encode()))))
                assert np.array_equal(stored, read(folder / sub / f"{index:05d}.png"))
    assert len(keys) == 1 + 3 * 4
    data = build_training_data(resolution=64, upscale_factor=4, train_data_dir=str(out))
    assert len(data.dataset) == 4 and data.dataset[0]["lr"].shape == (3, 16, 16)


def test_parquet_dataset_for_the_training_scripts(source, tmp_path):
    import datasets

    from diffusers_sr3.data import build_training_data

    out = tmp_path / "parquet"
    arguments = ["prepare", str(source), "--out", str(out), "--sizes", "16,64", "--format", "parquet"]
    assert main(arguments + ["--shard-size", "3", "--n_worker", "0"]) == 0
    shards = sorted(str(p) for p in (out / "data").glob("*.parquet"))
    assert [p.rsplit("/", 1)[1] for p in shards] == ["train-00000.parquet", "train-00003.parquet"]
    loaded = datasets.load_dataset("parquet", data_files=shards, split="train")
    assert loaded.column_names == ["image", "lr", "sr", "name"]
    assert loaded["name"] == ["a.png", "b.jpg", "sub/c.png", "sub/e.webp"]
    assert loaded[2]["image"].size == (64, 64) and loaded[2]["lr"].size == (16, 16)
    data = build_training_data(resolution=64, upscale_factor=4, train_data_files=shards)
    assert len(data.dataset) == 4 and data.dataset[3]["hr"].shape == (3, 64, 64)


@pytest.mark.parametrize("fmt", ["folder", "parquet", "lmdb"])
def test_an_interrupted_run_completes_when_run_again(source, tmp_path, monkeypatch, fmt):
    arguments = ["prepare", str(source), "--sizes", "16,32", "--n_worker", "0", "--format", fmt, "--shard-size", "2"]
    assert main(arguments + ["--out", str(tmp_path / "clean")]) == 0

    calls = []
    real = prepare.process_file

    def interrupted(job):
        calls.append(job)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(prepare, "process_file", interrupted)
    out = tmp_path / "resumed"
    assert main(arguments + ["--out", str(out)]) == 130
    state = json.loads((out / ".sr3_prepare.json").read_text(encoding="utf-8"))
    assert not state["complete"] and 0 < state["position"] <= 3
    monkeypatch.setattr(prepare, "process_file", real)
    assert main(arguments + ["--out", str(out)]) == 0
    state = json.loads((out / ".sr3_prepare.json").read_text(encoding="utf-8"))
    assert state["complete"] and state["written"] == 4
    if fmt == "lmdb":
        import lmdb

        for folder in ("clean", "resumed"):
            with lmdb.open(str(tmp_path / folder), readonly=True, lock=False) as environment:
                with environment.begin() as transaction:
                    contents = {key: value for key, value in transaction.cursor()}
            if folder == "clean":
                expected = contents
        assert contents == expected
    else:
        clean = sorted(p.relative_to(tmp_path / "clean") for p in (tmp_path / "clean").rglob("*") if p.is_file())
        resumed = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
        assert resumed == clean  # no temporary files left behind
        for relative in clean:
            if relative.suffix == ".png":
                assert (out / relative).read_bytes() == (tmp_path / "clean" / relative).read_bytes()
            elif relative.suffix == ".parquet":
                assert PIL.Image.open(io.BytesIO(_first_image(out / relative))).size == (32, 32)


class Killed(BaseException):
    """Stands for kill -9 or the OOM killer: nothing after it runs."""


@pytest.mark.parametrize("fmt", ["folder", "parquet", "lmdb"])
def test_a_run_killed_as_it_creates_the_layout_completes_when_run_again(source, tmp_path, monkeypatch, fmt):
    out = tmp_path / "out"
    arguments = ["prepare", str(source), "--sizes", "16,32", "--n_worker", "0", "--format", fmt, "--out", str(out)]
    real = prepare._Writer.__init__

    def killed_after_the_layout(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if self.environment is not None:
            self.environment.close()  # the kernel closes it for a killed process
        raise Killed

    monkeypatch.setattr(prepare._Writer, "__init__", killed_after_the_layout)
    with pytest.raises(Killed):
        main(arguments)
    monkeypatch.setattr(prepare._Writer, "__init__", real)
    assert main(arguments) == 0
    state = json.loads((out / ".sr3_prepare.json").read_text(encoding="utf-8"))
    assert state["complete"] and state["written"] == 4 and list(state["skipped"]) == ["sub/d.png"]


_process_file = prepare.process_file


def _reporting_the_workers_sigint_handler(job):
    """`process_file`, giving how the worker handles SIGINT as the reason an unreadable file was skipped."""
    images, error, small = _process_file(job)
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    reason = None if images is not None else f"SIGINT {'ignored' if ignored else 'handled'} in the worker"
    return images, reason, small


def test_workers_leave_ctrl_c_to_the_main_process(source, tmp_path, monkeypatch):
    # Ctrl-C signals the whole process group: workers handling it would each print a KeyboardInterrupt traceback.
    monkeypatch.setattr(prepare, "process_file", _reporting_the_workers_sigint_handler)
    out = tmp_path / "out"
    assert main(["prepare", str(source), "--out", str(out), "--sizes", "16,32", "--n_worker", "2"]) == 0
    state = json.loads((out / ".sr3_prepare.json").read_text(encoding="utf-8"))
    assert state["skipped"] == {"sub/d.png": "SIGINT ignored in the worker"}, state
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _first_image(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).column("image")[0].as_py()["bytes"]


def test_output_folders_are_not_clobbered(source, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me", encoding="utf-8")
    assert main(["prepare", str(source), "--out", str(out), "--n_worker", "0"]) == 2
    assert "not empty" in capsys.readouterr().err and not (out / "lr_16").exists()
    assert main(["prepare", str(source), "--out", str(out), "--n_worker", "0", "--overwrite"]) == 0
    assert (out / "precious.txt").read_text(encoding="utf-8") == "keep me" and len(
        list((out / "hr_128").iterdir())
    ) == 4
    assert main(["prepare", str(source), "--out", str(out), "--sizes", "32,128", "--n_worker", "0"]) == 2
    assert "other settings (sizes differ)" in capsys.readouterr().err
    assert main(["prepare", str(source), "--out", str(out), "--sizes", "32,128", "--n_worker", "0", "--overwrite"]) == 0
    assert not (out / "lr_16").exists() and (out / "lr_32").is_dir() and (out / "precious.txt").exists()


def test_bad_arguments(source, tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "source folder not found" in capsys.readouterr().err
    assert main(["prepare", str(source), "--out", str(tmp_path / "o"), "--sizes", "128,16"]) == 2
    assert "0 < LR < HR" in capsys.readouterr().err
    assert main(["prepare", str(source), "--out", str(tmp_path / "o"), "--sizes", "16"]) == 2
    assert "two integers" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["prepare", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no images" in capsys.readouterr().err


def test_an_output_folder_inside_the_source_is_not_read_as_source(source, tmp_path, capsys):
    out = source / "prep"
    arguments = ["prepare", str(source), "--out", str(out), "--sizes", "16,32", "--n_worker", "0"]
    assert main(arguments) == 0
    first = {path: path.read_bytes() for path in out.rglob("*.png")}
    # A rerun finds the same sources (its own outputs are not among them) and has nothing to do.
    assert main(arguments) == 0
    assert "already complete: 4 images" in capsys.readouterr().out
    # --overwrite with other sizes reads the four sources again, not the twelve images written above.
    assert main(arguments[:-4] + ["--sizes", "8,32", "--n_worker", "0", "--overwrite"]) == 0
    state = json.loads((out / ".sr3_prepare.json").read_text(encoding="utf-8"))
    assert state["written"] == 4 and state["settings"]["files"] == 5
    assert {path: path.read_bytes() for path in (out / "hr_32").iterdir()} == {
        path: data for path, data in first.items() if path.parent.name == "hr_32"
    }
    # Through a link to the same folder, too.
    (tmp_path / "link").symlink_to(source)
    assert main(["prepare", str(source), "--out", str(tmp_path / "link" / "prep"), "--sizes", "8,32"]) == 0
    assert main(["prepare", str(source), "--out", str(source), "--n_worker", "0"]) == 2
    assert "is the source folder" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["{bad", '{"settings": 5}', "[1]", '{"settings": {"sizes": [8]}}', "\xff"])
def test_a_damaged_state_file_is_named_and_overwrite_starts_afresh(source, tmp_path, capsys, damage):
    out = tmp_path / "out"
    arguments = ["prepare", str(source), "--out", str(out), "--sizes", "16,32", "--n_worker", "0"]
    assert main(arguments) == 0
    state_file = out / ".sr3_prepare.json"
    state_file.write_bytes(damage.encode("latin-1"))
    capsys.readouterr()
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert f"{state_file} is damaged" in error and "--overwrite to start afresh" in error
    assert len(error.strip().splitlines()) == 1 and (out / "hr_32" / "00000.png").exists()
    assert main(arguments + ["--overwrite"]) == 0
    state = json.loads(state_file.read_text(encoding="utf-8"))
    assert state["complete"] and state["written"] == 4 and len(list((out / "hr_32").iterdir())) == 4


def test_overwrite_prepares_a_finished_dataset_again_and_a_changed_source_is_not_resumed(source, tmp_path, capsys):
    out = tmp_path / "out"
    arguments = ["prepare", str(source), "--out", str(out), "--sizes", "16,32", "--n_worker", "0"]
    assert main(arguments) == 0
    first = (out / "hr_32" / "00000.png").read_bytes()
    # a.png fixed in place: same name, other content (and size)
    PIL.Image.new("RGB", (64, 64), (200, 30, 30)).save(source / "a.png")
    capsys.readouterr()
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert "other settings (source file sizes or modification times differ)" in error
    assert "--overwrite" in error and (out / "hr_32" / "00000.png").read_bytes() == first
    assert main(arguments + ["--overwrite"]) == 0
    assert "already complete" not in capsys.readouterr().out
    assert read(out / "hr_32" / "00000.png").tolist() == [[[200, 30, 30]] * 32] * 32
    # A finished dataset of unchanged sources: --overwrite prepares it again (it was "already complete" before).
    (out / "hr_32" / "00000.png").write_bytes(b"damaged by hand")
    assert main(arguments) == 0 and "already complete" in capsys.readouterr().out
    assert main(arguments + ["--overwrite"]) == 0
    assert read(out / "hr_32" / "00000.png").tolist() == [[[200, 30, 30]] * 32] * 32


def test_a_state_written_before_sizes_and_times_were_recorded_still_resumes(source, tmp_path, capsys):
    out = tmp_path / "out"
    arguments = ["prepare", str(source), "--out", str(out), "--sizes", "16,32", "--n_worker", "0"]
    assert main(arguments) == 0
    state_file = out / ".sr3_prepare.json"
    state = json.loads(state_file.read_text(encoding="utf-8"))
    del state["settings"]["files_size_mtime_sha256"]
    del state["settings"]["upsample_small"], state["small"]  # recorded from the eleventh round on
    state_file.write_text(json.dumps(state), encoding="utf-8")
    capsys.readouterr()
    assert main(arguments) == 0 and "already complete: 4 images" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["folder", "lmdb"])
def test_a_folder_without_a_readable_image_fails_and_leaves_nothing(tmp_path, capsys, fmt):
    if fmt == "lmdb":
        pytest.importorskip("lmdb")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("a.png", "b.jpg", "c.webp"):
        (source / name).write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(["prepare", str(source), "--out", str(out), "--format", fmt, "--n_worker", "0"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's lines
    assert error.startswith(f"sr3 prepare: error: none of the 3 image files under {source} could be read")
    assert "a.png" in error and not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("kept", encoding="utf-8")
    assert main(["prepare", str(source), "--out", str(out), "--format", fmt, "--overwrite", "--n_worker", "0"]) == 2
    assert sorted(path.name for path in out.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("fmt", ["folder", "parquet"])
def test_file_names_that_are_not_utf8_are_prepared(source, tmp_path, capsys, fmt):
    if fmt == "parquet":
        pytest.importorskip("datasets")
    shutil.copy(source / "a.png", os.path.join(os.fsencode(source), b"caf\xe9.png"))
    unreadable = os.path.join(os.fsencode(source / "sub"), b"\xff.png")
    os.rename(os.fsencode(source / "sub" / "d.png"), unreadable)
    out = tmp_path / "out"
    assert main(["prepare", str(source), "--out", str(out), "--format", fmt, "--n_worker", "0"]) == 0
    output = capsys.readouterr()
    assert "skipped unreadable" in output.err + output.out and "sub/\ufffd.png" in output.err + output.out
    state = json.loads((out / ".sr3_prepare.json").read_text(encoding="utf-8"))
    assert state["complete"] and state["written"] == 5
    if fmt == "parquet":
        import pyarrow.parquet as pq

        names = pq.read_table(next((out / "data").iterdir())).column("name").to_pylist()
        assert names == ["a.png", "b.jpg", "caf\ufffd.png", "sub/c.png", "sub/e.webp"]


def test_photos_smaller_than_the_hr_size_are_skipped_with_one_warning(source, tmp_path, capsys):
    """Enlarged to the HR size, as the original's prepare.py does, a small photo became a blurred HR image that a model
    trained on learns to reproduce; such photos are skipped, counted and named in one line."""
    out = tmp_path / "out"
    for index, size in enumerate([(60, 300), (100, 100), (150, 260), (300, 90)]):  # all below 256 on a side
        PIL.Image.open(source / "a.png").convert("RGB").resize(size).save(source / "sub" / f"small{index}.png")
    assert main(["prepare", str(source), "--out", str(out), "--sizes", "64,256", "--n_worker", "0"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: skipped 6 photo(s) smaller than the HR size 256, which would be enlarged into blurred HR images: "
        "sub/c.png (512x200), sub/e.webp (200x512), sub/small0.png (60x300) and 3 more; pass --upsample_small to "
        "enlarge them"
    ]
    last = captured.out.splitlines()[-1]  # after the progress bar's note of the unreadable sub/d.png
    assert last == f"wrote 2 images (64 -> 256) to {out} as PNG folders; skipped 1 unreadable file(s)"
    # Numbered without gaps, as the original's data loader needs: a.png and b.jpg, the two photos large enough.
    assert sorted(path.name for path in (out / "hr_256").iterdir()) == ["00000.png", "00001.png"]
    expected = reference_resize(PIL.Image.open(source / "b.jpg").convert("RGB"), 256)
    assert np.array_equal(read(out / "hr_256" / "00001.png"), np.asarray(expected))
    state = json.loads((out / ".sr3_prepare.json").read_text(encoding="utf-8"))
    assert state["small"]["sub/small1.png"] == "100x100" and len(state["small"]) == 6
    assert main(["prepare", str(source), "--out", str(out), "--sizes", "64,256"]) == 0
    assert capsys.readouterr().out == f"{out} is already complete: 2 images (1 skipped, 6 smaller than 256 left out)\n"
    # Enlarging them instead is another dataset: refused over this one.
    assert main(["prepare", str(source), "--out", str(out), "--sizes", "64,256", "--upsample_small"]) == 2
    assert "(--upsample_small differ)" in capsys.readouterr().err


def test_upsample_small_enlarges_small_photos_as_the_original_does(source, tmp_path, capsys):
    out = tmp_path / "out"
    arguments = ["prepare", str(source), "--out", str(out), "--sizes", "64,256", "--n_worker", "0"]
    assert main([*arguments, "--upsample-small"]) == 0
    assert "warning" not in capsys.readouterr().err
    names = ["a.png", "b.jpg", "sub/c.png", "sub/e.webp"]
    assert sorted(path.name for path in (out / "hr_256").iterdir()) == [f"{i:05d}.png" for i in range(4)]
    for index, name in enumerate(names):
        image = PIL.Image.open(source / name).convert("RGB")
        assert np.array_equal(read(out / "hr_256" / f"{index:05d}.png"), np.asarray(reference_resize(image, 256)))


@pytest.mark.parametrize("unreadable", [False, True])
def test_a_folder_of_photos_all_too_small_is_refused_and_leaves_nothing(tmp_path, capsys, unreadable):
    source = tmp_path / "source"
    source.mkdir()
    for index in range(2):
        PIL.Image.new("RGB", (40 + index, 50), (10, 20, 30)).save(source / f"p{index}.png")
    if unreadable:
        (source / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(["prepare", str(source), "--out", str(out), "--sizes", "16,64", "--n_worker", "0"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    count, problem = (3, "1 could not be read (the first: ") if unreadable else (2, "")
    assert error.startswith(f"sr3 prepare: error: none of the {count} image files under {source} can be used: ")
    assert problem in error
    assert error.endswith(
        "2 photo(s) smaller than the HR size 64, which would be enlarged into blurred HR images: p0.png (40x50), "
        "p1.png (41x50); nothing was written: choose an HR size they reach, or pass --upsample_small to enlarge them"
    )
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["folder", "lmdb"])
def test_a_run_an_earlier_version_started_is_finished_enlarging_as_it_began(source, tmp_path, monkeypatch, capsys, fmt):
    """An earlier version enlarged small photos; resumed by this one, its run skipped the small photos it had not yet
    reached, a dataset of both kinds whose record said none was enlarged. It is finished as it began."""
    arguments = ["prepare", str(source), "--sizes", "16,256", "--n_worker", "0", "--format", fmt]
    assert main([*arguments, "--out", str(tmp_path / "clean"), "--upsample_small"]) == 0
    calls = []
    real = prepare.process_file

    def interrupted(job):
        calls.append(job)
        if len(calls) == 4:  # after a.png, b.jpg and sub/c.png (512x200, enlarged), before sub/e.webp (200x512)
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(prepare, "process_file", interrupted)
    monkeypatch.setattr(prepare, "SAVE_EVERY_SECONDS", 0.0)
    out = tmp_path / "out"
    assert main([*arguments, "--out", str(out), "--upsample_small"]) == 130
    monkeypatch.setattr(prepare, "process_file", real)
    state_file = out / ".sr3_prepare.json"
    state = json.loads(state_file.read_text(encoding="utf-8"))
    assert state["position"] == 3 and not state["complete"]
    del state["settings"]["upsample_small"], state["small"]  # as the earlier version recorded it
    state_file.write_text(json.dumps(state), encoding="utf-8")
    capsys.readouterr()
    assert main([*arguments, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    assert f"note: {out} was started by an earlier sr3 prepare, which enlarged photos smaller than the HR size" in (
        captured.err
    )
    assert captured.out.splitlines()[-1].startswith(f"wrote 4 images (16 -> 256) to {out}")
    if fmt == "lmdb":
        import lmdb

        def contents(folder):
            with lmdb.open(str(folder), readonly=True, lock=False) as environment:
                with environment.begin() as transaction:
                    return dict(transaction.cursor())

        assert contents(out) == contents(tmp_path / "clean")
    else:
        for index in range(4):
            name = f"hr_256/{index:05d}.png"
            assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    state = json.loads(state_file.read_text(encoding="utf-8"))
    assert "upsample_small" not in state["settings"] and state["small"] == {} and state["written"] == 4
    for options in ([], ["--upsample_small"]):  # the same command again, either way, says it is complete
        assert main([*arguments, "--out", str(out), *options]) == 0
        assert capsys.readouterr().out == f"{out} is already complete: 4 images (1 skipped)\n"
