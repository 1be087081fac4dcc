"""One writer per output folder: a training run, `sr3 demo` or `sr3 prepare` into a folder another live run holds is
refused."""

import errno
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from test_data import make_image_folder
from test_training import fast_options

from diffusers_sr3.training import Trainer, TrainingConfig, train
from diffusers_sr3.training.output_lock import LOCK_FILE, OutputFolderBusyError, claim_output_folder, hold_for_reading

pytest.importorskip("fcntl")

HOLD = (
    "import sys; from diffusers_sr3.training.output_lock import claim_output_folder\n"
    "with claim_output_folder(*sys.argv[1:]):\n"
    "    print('held', flush=True); sys.stdin.read()\n"
)


@pytest.fixture
def held():
    """Hold a folder's lock from another process until the test ends (as a training run, or with the given option
    and writer); yields start, which returns the holder's pid."""
    holders = []

    def start(folder, *option_and_writer):
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(folder), *option_and_writer],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        holders.append(holder)
        assert holder.stdout.readline() == "held\n"
        return holder.pid

    yield start
    for holder in holders:
        holder.stdin.close()
        holder.wait(timeout=30)


def contents(folder):
    return sorted(
        os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names
    )


def test_a_held_folder_is_refused_naming_the_holder_and_left_as_it_is(tmp_path, held):
    pid = held(tmp_path / "out")
    before = contents(tmp_path / "out")
    with pytest.raises(OutputFolderBusyError) as refused:
        with claim_output_folder(str(tmp_path / "out")):
            pytest.fail("claimed a held folder")
    assert str(refused.value) == (
        f"{tmp_path / 'out'} is being written by another training run (pid {pid}); wait for it or choose another "
        "--output_dir"
    )
    assert contents(tmp_path / "out") == before == [LOCK_FILE]


def test_a_failed_claim_of_a_new_folder_leaves_no_folder(tmp_path):
    with pytest.raises(KeyError):
        with claim_output_folder(str(tmp_path / "new")):
            raise KeyError("failed")
    assert not (tmp_path / "new").exists()


def test_a_held_folder_refuses_a_run_and_a_resume_before_anything_changes(tmp_path, held):
    output = tmp_path / "out"
    (output / ".tmp-checkpoint-3").mkdir(parents=True)  # the live run's half-written checkpoint
    (output / ".tmp-checkpoint-3" / "model.safetensors").write_bytes(b"being written")
    (output / "checkpoint-2").mkdir()
    (output / "checkpoint-2" / "training_state.json").write_text('{"global_step": 2}', encoding="utf-8")
    pid = held(output)
    before = contents(output)
    data = str(tmp_path / "images")
    make_image_folder(data, count=2, size=(48, 48), bad=False)
    for resume in (None, "latest"):
        config = TrainingConfig(**fast_options(output, train_data_dir=data, resume_from_checkpoint=resume))
        with pytest.raises(OutputFolderBusyError, match=rf"\(pid {pid}\); wait for it or choose another --output_dir"):
            train(config)
        assert contents(output) == before


def test_a_finished_run_releases_its_folder(tmp_path):
    data = str(tmp_path / "images")
    make_image_folder(data, count=2, size=(48, 48), bad=False)
    output = tmp_path / "out"
    train(TrainingConfig(**fast_options(output, train_data_dir=data, max_train_steps=1)))
    assert (output / LOCK_FILE).is_file()
    # Another process can take the lock now (a second run into the folder would start).
    claim = (
        "import sys; from diffusers_sr3.training.output_lock import claim_output_folder as c\nwith c(sys.argv[1]): pass"
    )
    subprocess.run([sys.executable, "-c", claim, str(output)], check=True, timeout=60)


def test_a_second_demo_into_a_held_output_is_refused_in_one_line(tmp_path, held, capsys, monkeypatch):
    from diffusers_sr3.cli import main
    from diffusers_sr3.commands import demo

    monkeypatch.setattr(demo, "_train", lambda *args: pytest.fail("trained into a held --output"))
    pid = held(tmp_path / "demo")
    assert main(["demo", "--output", str(tmp_path / "demo"), "--steps", "1", "--overwrite"]) == 2
    assert capsys.readouterr().err == (
        f"sr3 demo: error: {tmp_path / 'demo'} is being written by another training run (pid {pid}); wait for it or "
        "choose another --output\n"
    )
    assert contents(tmp_path / "demo") == [LOCK_FILE]


def test_a_demo_rerun_leaves_a_model_folder_a_training_run_holds(tmp_path, held, capsys, monkeypatch):
    """`sr3 demo --overwrite` sets the earlier model aside: not one that a training run (`--output_dir OUT/model`) is
    writing, whose lock moves with the folder."""
    from diffusers_sr3.cli import main
    from diffusers_sr3.commands import demo

    model = tmp_path / "demo" / "model"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text("the earlier model", encoding="utf-8")
    monkeypatch.setattr(demo, "_train", lambda *args: pytest.fail("set the live run's folder aside"))
    pid = held(model)
    assert main(["demo", "--output", str(tmp_path / "demo"), "--steps", "1", "--overwrite"]) == 2
    assert capsys.readouterr().err.endswith(
        f"sr3 demo: error: {model} is being written by another training run (pid {pid}); wait for it or choose "
        "another --output\n"
    )
    assert os.listdir(tmp_path / "demo") == ["model"]  # as it was: the refused demo's lock file is gone too
    assert (model / "model_index.json").read_text(encoding="utf-8") == "the earlier model"


def test_a_staging_folder_removed_under_the_run_is_not_blamed_on_the_disk(tmp_path):
    trainer = Trainer(TrainingConfig(**fast_options(tmp_path, train_data_dir=str(tmp_path))))
    missing = str(tmp_path / ".tmp-checkpoint-3")
    error = trainer._checkpoint_error(
        SimpleNamespace(is_main_process=True), missing, 3, RuntimeError(f"Parent directory {missing} does not exist.")
    )
    assert "GiB free" not in str(error)
    assert str(error).startswith(f"cannot write checkpoint-3 in {tmp_path}: its staging folder .tmp-checkpoint-3 was")
    # A real write error still names the space left.
    os.mkdir(missing)
    error = trainer._checkpoint_error(SimpleNamespace(is_main_process=True), missing, 3, OSError(28, "No space"))
    assert "GiB free there" in str(error) and not os.path.exists(missing)


def test_the_lock_file_is_never_uploaded(tmp_path):
    from diffusers_sr3.training.hub import _ignore_patterns, _upload_operations, _uploaded_files

    with claim_output_folder(str(tmp_path)):
        (tmp_path / "model_index.json").write_text("{}", encoding="utf-8")
        uploaded = [
            operation.path_in_repo
            for operation in _upload_operations(
                str(tmp_path), "card", _uploaded_files(str(tmp_path), _ignore_patterns(str(tmp_path), "logs"))
            )
        ]
    assert uploaded == ["model_index.json"]


def prepare(source, out, *options):
    from diffusers_sr3.cli import main

    return main(["prepare", str(source), "--out", str(out), "--n_worker", "0", *options])


def test_a_prepare_into_a_folder_another_prepare_holds_is_refused_naming_it(tmp_path, held, capsys):
    """Two `sr3 prepare --overwrite` runs of different sizes into one folder removed and replaced each other's images;
    the second is refused before it reads or changes the folder, and says which process holds it."""
    source = make_image_folder(str(tmp_path / "images"), count=2, size=(48, 48), bad=False)
    out = tmp_path / "out"
    assert prepare(source, out, "--sizes", "8,16") == 0
    capsys.readouterr()
    before = contents(out)
    pid = held(out, "--out", "sr3 prepare")
    for options in (["--sizes", "16,32", "--overwrite"], ["--sizes", "8,16"]):
        assert prepare(source, out, *options) == 2
        assert capsys.readouterr().err == (
            f"sr3 prepare: error: {out} is being written by another sr3 prepare (pid {pid}); wait for it or choose "
            "another --out\n"
        )
        assert contents(out) == before
    assert LOCK_FILE in before  # a finished prepare leaves its (released) lock file, as a training run does


def test_a_prepare_into_a_training_runs_folder_is_refused_and_a_training_run_into_a_prepares(tmp_path, held, capsys):
    source = make_image_folder(str(tmp_path / "images"), count=2, size=(48, 48), bad=False)
    pid = held(tmp_path / "run")  # a training run's --output_dir
    assert prepare(source, tmp_path / "run", "--sizes", "8,16") == 2
    assert capsys.readouterr().err == (
        f"sr3 prepare: error: {tmp_path / 'run'} is being written by another training run (pid {pid}); wait for it "
        "or choose another --out\n"
    )
    assert contents(tmp_path / "run") == [LOCK_FILE]
    pid = held(tmp_path / "dataset", "--out", "sr3 prepare")
    config = TrainingConfig(**fast_options(tmp_path / "dataset", train_data_dir=source))
    with pytest.raises(
        OutputFolderBusyError, match=rf"another sr3 prepare \(pid {pid}\); wait for it or choose another"
    ):
        train(config)


def test_a_refused_claim_leaves_no_lock_file_in_a_folder_it_did_not_write(tmp_path, capsys):
    source = make_image_folder(str(tmp_path / "images"), count=2, size=(48, 48), bad=False)
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("not a dataset", encoding="utf-8")
    assert prepare(source, out) == 2
    assert "is not empty and was not made by sr3 prepare" in capsys.readouterr().err
    assert contents(out) == ["notes.txt"]


def test_a_prepare_rerun_over_a_finished_dataset_it_cannot_write_says_it_is_complete(tmp_path, monkeypatch, capsys):
    """Rerunning the same `sr3 prepare` over a finished dataset on a read-only mount said it was complete; taking the
    lock, which needs its file opened for writing, made it fail. A folder it cannot write is still refused where the
    run would have to write into it."""
    import errno

    source = make_image_folder(str(tmp_path / "images"), count=2, size=(48, 48), bad=False)
    out = tmp_path / "out"
    assert prepare(source, out, "--sizes", "8,16") == 0
    capsys.readouterr()
    before = contents(out)
    real_open = os.open

    def read_only_lock_file(path, flags, *args, **kwargs):  # as on a read-only mount
        if os.path.basename(path) == LOCK_FILE and flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_lock_file)
    assert prepare(source, out, "--sizes", "8,16") == 0
    assert capsys.readouterr().out == f"{out} is already complete: 2 images (0 skipped)\n"
    for options in (["--sizes", "16,32"], ["--sizes", "8,16", "--overwrite"]):
        assert prepare(source, out, *options) == 2
        assert capsys.readouterr().err == f"sr3 prepare: error: --out {out} is not writable (Read-only file system)\n"
    monkeypatch.undo()
    assert contents(out) == before


READ = (
    "import sys; from diffusers_sr3.training.output_lock import hold_for_reading\n"
    "with hold_for_reading(sys.argv[1], '--train_data_dir'):\n"
    "    print('reading', flush=True); sys.stdin.read()\n"
)


def test_a_training_run_or_eval_on_a_dataset_being_prepared_is_refused_naming_the_prepare(tmp_path, held, capsys):
    """A training run on a folder that `sr3 prepare` was still writing trained on the images written so far; it and
    `sr3 eval` of the folder's hr_/lr_ images are refused at once instead, whatever format the prepare writes."""
    from diffusers_sr3.cli import main

    source = make_image_folder(str(tmp_path / "images"), count=2, size=(48, 48), bad=False)
    folders, parquet = tmp_path / "folders", tmp_path / "parquet"
    assert prepare(source, folders, "--sizes", "8,16") == 0
    assert prepare(source, parquet, "--sizes", "8,16", "--format", "parquet") == 0
    capsys.readouterr()
    pid = held(folders, "--out", "sr3 prepare")
    config = TrainingConfig(**fast_options(tmp_path / "run", train_data_dir=str(folders), resolution=16))
    with pytest.raises(OutputFolderBusyError) as refused:
        train(config)
    assert str(refused.value) == (
        f"--train_data_dir {folders} is still being written by sr3 prepare (pid {pid}): training on it now would read "
        "a half-written dataset; wait for the prepare to finish"
    )
    assert not (tmp_path / "run").exists()  # the refused run leaves no output folder behind
    assert main(["eval", "--hr", str(folders / "hr_16"), "--sr", str(folders / "sr_8_16")]) == 2
    assert capsys.readouterr().err == (
        f"sr3 eval: error: --hr {folders} is still being written by sr3 prepare (pid {pid}): evaluating it now would "
        "read a half-written dataset; wait for the prepare to finish\n"
    )
    pid = held(parquet, "--out", "sr3 prepare")
    files = [str(parquet / "data" / "*.parquet")]
    config = TrainingConfig(**fast_options(tmp_path / "run", train_data_files=files, resolution=16))
    with pytest.raises(OutputFolderBusyError, match=rf"--train_data_files {parquet} is still .* \(pid {pid}\)"):
        train(config)


def test_a_prepare_into_a_dataset_being_read_is_refused_and_two_readers_share_it(tmp_path, capsys):
    source = make_image_folder(str(tmp_path / "images"), count=2, size=(48, 48), bad=False)
    out = tmp_path / "out"
    assert prepare(source, out, "--sizes", "8,16") == 0
    capsys.readouterr()
    before = contents(out)
    with hold_for_reading(str(out), "--train_data_dir"), hold_for_reading(str(out), "--hr", "evaluating it"):
        for options in (["--sizes", "8,16", "--overwrite"], ["--sizes", "16,32"]):
            assert prepare(source, out, *options) == 2
            assert capsys.readouterr().err == (
                f"sr3 prepare: error: {out} is being read as training or evaluation data (pid {os.getpid()}); wait "
                "for that to end or choose another --out\n"
            )
        # The same prepare again writes nothing: it says the dataset is complete, as without readers.
        assert prepare(source, out, "--sizes", "8,16") == 0
        assert capsys.readouterr().out == f"{out} is already complete: 2 images (0 skipped)\n"
        with pytest.raises(OutputFolderBusyError, match="is being read as training or evaluation data"):
            with claim_output_folder(str(out)):
                pytest.fail("a training run wrote into a dataset being read")
        assert contents(out) == before
    assert prepare(source, out, "--sizes", "16,32", "--overwrite") == 0  # released


def test_a_training_run_holds_its_dataset_until_it_ends_against_a_prepare_in_another_process(tmp_path, monkeypatch):
    """A prepare started after the training run (here `sr3 prepare --overwrite` in another process, which would have
    replaced the images under the run) is refused while the run reads them. The original's layout, which has no
    lock file, gets one."""
    from diffusers_sr3.commands.prepare import STATE_FILE

    source = make_image_folder(str(tmp_path / "images"), count=2, size=(48, 48), bad=False)
    dataset = tmp_path / "dataset"
    assert prepare(source, dataset, "--sizes", "8,16") == 0
    os.remove(dataset / LOCK_FILE)
    os.remove(dataset / STATE_FILE)  # as the original's prepare.py leaves it
    command = [sys.executable, "-m", "diffusers_sr3", "prepare", source, "--out", str(dataset), "--sizes", "8,16"]
    refusals = []

    def run_reading(trainer):
        prepared = subprocess.run([*command, "--overwrite"], capture_output=True, text=True, timeout=120)
        refusals.append((prepared.returncode, prepared.stderr))
        return trainer.config.output_dir

    monkeypatch.setattr(Trainer, "_run", run_reading)
    train(TrainingConfig(**fast_options(tmp_path / "run", train_data_dir=str(dataset), resolution=16)))
    assert refusals == [
        (
            2,
            f"sr3 prepare: error: {dataset} is being read as training or evaluation data (pid {os.getpid()}); wait "
            "for that to end or choose another --out\n",
        )
    ]
    assert sorted(os.listdir(dataset)) == [LOCK_FILE, "hr_16", "lr_8", "sr_8_16"]


def test_a_prepare_is_refused_naming_a_reader_in_another_process(tmp_path, capsys):
    source = make_image_folder(str(tmp_path / "images"), count=2, size=(48, 48), bad=False)
    out = tmp_path / "out"
    assert prepare(source, out, "--sizes", "8,16") == 0
    capsys.readouterr()
    reader = subprocess.Popen(
        [sys.executable, "-c", READ, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout.readline() == "reading\n"
        assert prepare(source, out, "--sizes", "8,16", "--overwrite") == 2
        error = capsys.readouterr().err
        assert error.startswith(f"sr3 prepare: error: {out} is being read as training or evaluation data")
        if os.path.exists("/proc/locks"):
            assert f"(pid {reader.pid})" in error
    finally:
        reader.stdin.close()
        reader.wait(timeout=30)
    assert prepare(source, out, "--sizes", "8,16", "--overwrite") == 0


def test_a_folder_that_is_no_dataset_is_read_unlocked(tmp_path, held):
    """Images in a training run's own folder may be read (evaluated, trained on) while it runs, and its resume is not
    refused because something reads them; a plain photo folder gets no lock file."""
    photos = make_image_folder(str(tmp_path / "photos"), count=2, size=(48, 48), bad=False)
    with hold_for_reading(photos, "--train_data_dir"):
        with claim_output_folder(str(tmp_path / "photos")):
            pass
    os.remove(os.path.join(photos, LOCK_FILE))
    with hold_for_reading(photos, "--train_data_dir"):
        assert LOCK_FILE not in os.listdir(photos)
    held(tmp_path / "run")
    with hold_for_reading(str(tmp_path / "run"), "--hr", "evaluating it"):
        pass


def test_a_training_run_on_a_folder_inside_a_dataset_being_prepared_is_refused_as_eval_is(tmp_path, held, capsys):
    """`--train_data_dir OUT/hr_16` (the HR images alone, a plain image folder) read a dataset `sr3 prepare` was still
    writing, which `sr3 eval --hr OUT/hr_16` refused: the run looks for the lock one level up too, and holds it."""
    source = make_image_folder(str(tmp_path / "images"), count=2, size=(48, 48), bad=False)
    out = tmp_path / "out"
    assert prepare(source, out, "--sizes", "8,16") == 0
    capsys.readouterr()
    pid = held(out, "--out", "sr3 prepare")
    config = TrainingConfig(**fast_options(tmp_path / "run", train_data_dir=str(out / "hr_16"), resolution=16))
    with pytest.raises(OutputFolderBusyError) as refused:
        train(config)
    assert str(refused.value) == (
        f"--train_data_dir {out} is still being written by sr3 prepare (pid {pid}): training on it now would read a "
        "half-written dataset; wait for the prepare to finish"
    )
    assert LOCK_FILE not in os.listdir(out / "hr_16")


def test_a_training_run_on_a_folder_inside_a_dataset_holds_the_dataset(tmp_path, monkeypatch, capsys):
    source = make_image_folder(str(tmp_path / "images"), count=2, size=(48, 48), bad=False)
    out = tmp_path / "out"
    assert prepare(source, out, "--sizes", "8,16") == 0
    capsys.readouterr()
    statuses = []

    def run_reading(trainer):
        statuses.append(prepare(source, out, "--sizes", "8,16", "--overwrite"))
        return trainer.config.output_dir

    monkeypatch.setattr(Trainer, "_run", run_reading)
    train(TrainingConfig(**fast_options(tmp_path / "run", train_data_dir=str(out / "hr_16"), resolution=16)))
    assert statuses == [2] and "is being read as training or evaluation data" in capsys.readouterr().err


def interrupted_prepare(source, out, monkeypatch, *options):
    """Run `sr3 prepare` of `source` (3 images) into `out` as if killed after its first image (Ctrl-C)."""
    import diffusers_sr3.commands.prepare as prepare_command

    real_process_file, calls = prepare_command.process_file, []

    def killed_after_one(job):
        calls.append(job)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_process_file(job)

    monkeypatch.setattr(prepare_command, "process_file", killed_after_one)
    assert prepare(source, out, "--sizes", "8,16", *options) == 130
    monkeypatch.undo()


def test_a_training_run_eval_or_upscale_of_a_dataset_whose_prepare_stopped_is_refused_naming_the_fix(
    tmp_path, monkeypatch, capsys
):
    """A dataset whose `sr3 prepare` was killed (its record says unfinished, no prepare holds it) was trained on,
    evaluated and upscaled in part without a word; each is refused, saying how far it got and which command finishes
    it, and that command does."""
    import shlex

    from diffusers_sr3.cli import main

    source = make_image_folder(str(tmp_path / "images"), count=3, size=(48, 48), bad=False, nested=False)
    out = tmp_path / "out"
    interrupted_prepare(source, out, monkeypatch, "--resample", "bilinear")
    capsys.readouterr()
    command = f"sr3 prepare {source} --out {out} --sizes 8,16 --resample bilinear"
    refusal = (
        f"{out} holds a dataset that sr3 prepare did not finish (1 image(s) written from the first 1 of its 3 source "
        f"files): {{}} now would read part of it; rerun the same sr3 prepare command to finish it ({command})"
    )
    config = TrainingConfig(**fast_options(tmp_path / "run", train_data_dir=str(out / "hr_16"), resolution=16))
    with pytest.raises(ValueError) as refused:
        train(config)
    assert str(refused.value) == "--train_data_dir " + refusal.format("training on it")
    assert not (tmp_path / "run").exists()
    assert main(["eval", "--hr", str(out / "hr_16"), "--sr", str(out / "sr_8_16")]) == 2
    assert capsys.readouterr().err == "sr3 eval: error: --hr " + refusal.format("evaluating it") + "\n"
    for inputs in ([str(out / "lr_8")], [str(out / "lr_8" / "*.png")], [str(out)]):
        assert main(["upscale", *inputs, "--output", str(tmp_path / "sr")]) == 2
        assert capsys.readouterr().err == "sr3 upscale: error: input " + refusal.format("upscaling it") + "\n"
    assert not (tmp_path / "sr").exists()
    # The command it names finishes the dataset, which is then read.
    assert main([*shlex.split(command)[1:], "--n_worker", "0"]) == 0
    assert len(os.listdir(out / "hr_16")) == 3
    with hold_for_reading(str(out), "--train_data_dir"):
        pass


def test_a_dataset_an_earlier_version_left_unfinished_is_refused_with_the_command_that_resumes_it(
    tmp_path, monkeypatch
):
    """A record of the first sr3 prepare (no `small`, `upsample_small` or size/time hash) is read too; the command
    it names leaves out --upsample_small, as that version's run is resumed as it prepared (enlarging)."""
    import json
    import shlex

    from diffusers_sr3.cli import main
    from diffusers_sr3.commands.prepare import STATE_FILE

    source = make_image_folder(str(tmp_path / "images"), count=3, size=(48, 48), bad=False, nested=False)
    out = tmp_path / "out"
    interrupted_prepare(source, out, monkeypatch, "--upsample_small")
    record = json.loads((out / STATE_FILE).read_text(encoding="utf-8"))
    del record["small"], record["settings"]["upsample_small"], record["settings"]["files_size_mtime_sha256"]
    (out / STATE_FILE).write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(ValueError) as refused:
        with hold_for_reading(str(out), "--train_data_dir"):
            pytest.fail("read an unfinished dataset")
    command = f"sr3 prepare {source} --out {out} --sizes 8,16"
    assert str(refused.value).endswith(
        f"of its 3 source files): training on it now would read part of it; rerun "
        f"the same sr3 prepare command to finish it ({command})"
    )
    assert main([*shlex.split(command)[1:], "--n_worker", "0"]) == 0
    assert json.loads((out / STATE_FILE).read_text(encoding="utf-8"))["complete"] is True


def test_an_upscale_of_a_folder_being_prepared_is_refused_and_holds_the_dataset_it_reads(
    tmp_path, held, monkeypatch, capsys
):
    """`sr3 upscale OUT/lr_8` during a prepare upscaled the images written so far; it is refused as `sr3 eval` is, and
    a prepare into the dataset while it upscales is refused."""
    import diffusers_sr3.commands.upscale as upscale_command
    from diffusers_sr3.cli import main

    source = make_image_folder(str(tmp_path / "images"), count=2, size=(48, 48), bad=False)
    out = tmp_path / "out"
    assert prepare(source, out, "--sizes", "8,16") == 0
    capsys.readouterr()
    statuses = []

    def plan_preparing(inputs, output):  # where the upscale lists its inputs: it is reading them from here on
        statuses.append(prepare(source, out, "--sizes", "8,16", "--overwrite"))
        raise ValueError("stopped before the model")

    monkeypatch.setattr(upscale_command, "_plan_writes", plan_preparing)
    assert main(["upscale", str(out / "lr_8" / "*.png"), "--output", str(tmp_path / "sr")]) == 2
    error = capsys.readouterr().err
    assert statuses == [2] and "is being read as training or evaluation data" in error
    pid = held(out, "--out", "sr3 prepare")
    assert main(["upscale", str(out / "lr_8"), "--output", str(tmp_path / "sr")]) == 2
    assert capsys.readouterr().err == (
        f"sr3 upscale: error: input {out} is still being written by sr3 prepare (pid {pid}): upscaling it now would "
        "read a half-written dataset; wait for the prepare to finish\n"
    )
    assert statuses == [2]


def test_a_reader_creates_no_lock_file_in_another_users_dataset(tmp_path, monkeypatch):
    """A reader of a dataset of the original's layout (no lock file) created one, its own: the dataset's owner's
    writers could not open it. In a folder of another user it reads as on a read-only mount; in its own it still
    creates one."""
    from diffusers_sr3.commands.prepare import STATE_FILE

    source = make_image_folder(str(tmp_path / "images"), count=2, size=(48, 48), bad=False)
    dataset = tmp_path / "dataset"
    assert prepare(source, dataset, "--sizes", "8,16") == 0
    os.remove(dataset / LOCK_FILE)
    os.remove(dataset / STATE_FILE)
    owner = os.stat(dataset).st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    with hold_for_reading(str(dataset), "--train_data_dir"):
        assert LOCK_FILE not in os.listdir(dataset)
    monkeypatch.undo()
    with hold_for_reading(str(dataset), "--train_data_dir"):
        assert LOCK_FILE in os.listdir(dataset)


def test_a_writer_takes_over_a_lock_file_of_another_user_that_no_one_holds(tmp_path, monkeypatch, capsys):
    """A lock file another user's run left in a dataset (0644, theirs) made its owner's `sr3 prepare --overwrite`
    fail as "not writable" though the folder is. The writer locks it read-only (flock needs no write access): held by
    a reader, the prepare is refused as such; held by no one, it is replaced by the writer's own. Where it cannot be
    replaced or read, the message names the lock file and its owner."""
    import errno

    source = make_image_folder(str(tmp_path / "images"), count=2, size=(48, 48), bad=False)
    out = tmp_path / "out"
    assert prepare(source, out, "--sizes", "8,16") == 0
    capsys.readouterr()
    lock = out / LOCK_FILE
    lock.write_text("4242\ntraining run\n", encoding="utf-8")  # another user's, left by their run
    uid = os.stat(lock).st_uid
    real_open, real_remove = os.open, os.remove
    foreign, unreadable, removable = [True], [], []

    def another_users_lock_file(path, flags, *args, **kwargs):  # 0644 and not ours: read-only, or not even that
        if foreign and os.path.basename(path) == LOCK_FILE and os.path.exists(path):
            if unreadable or flags & (os.O_RDWR | os.O_WRONLY):
                raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    def removed_where_removable(path, *args, **kwargs):
        if os.path.basename(path) == LOCK_FILE:
            if not removable:
                raise PermissionError(errno.EACCES, "Permission denied", path)
            foreign.clear()
        return real_remove(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", another_users_lock_file)
    monkeypatch.setattr(os, "remove", removed_where_removable)
    with hold_for_reading(str(out), "--train_data_dir"):
        removable.append(True)
        assert prepare(source, out, "--sizes", "8,16", "--overwrite") == 2
        assert capsys.readouterr().err.startswith(f"sr3 prepare: error: {out} is being read as training or evaluation")
        removable.clear()
    assert prepare(source, out, "--sizes", "8,16", "--overwrite") == 2
    assert capsys.readouterr().err == (
        f"sr3 prepare: error: --out {out} is not writable (Permission denied): its lock file {lock} belongs to uid "
        f"{uid}, and this user can neither write it nor replace it\n"
    )
    unreadable.append(True)
    removable.append(True)
    assert prepare(source, out, "--sizes", "8,16", "--overwrite") == 2
    assert capsys.readouterr().err == (
        f"sr3 prepare: error: --out {out}: its lock file {lock} belongs to uid {uid} and cannot be opened (Permission "
        "denied): remove it once no run of that user reads or writes the folder\n"
    )
    unreadable.clear()
    assert lock.read_text(encoding="utf-8") == "4242\ntraining run\n" and foreign
    assert prepare(source, out, "--sizes", "8,16", "--overwrite") == 0
    assert lock.read_text(encoding="utf-8") == f"{os.getpid()}\nsr3 prepare\n" and not foreign


def test_two_writers_taking_over_one_lock_file_of_another_user_do_not_both_hold_the_folder(tmp_path, held):
    """Two writers met another user's lock file that no one held: the first locked it, removed it and created and
    locked its own; the second, which had opened the old file meanwhile, then locked the old (removed) file and
    removed the first one's new file by name, created a third, and both wrote the folder. The second is refused."""
    import errno

    import diffusers_sr3.training.output_lock as output_lock

    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_FILE
    lock.write_text("4242\ntraining run\n", encoding="utf-8")  # another user's, left by their run
    real_open, real_flock, pids = os.open, output_lock.fcntl.flock, []

    def another_users_lock_file(path, flags, *args, **kwargs):  # every lock file here is not ours: read-only
        if os.path.basename(path) == LOCK_FILE and os.path.exists(path) and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    def first_writer_takes_over_meanwhile(descriptor, operation):
        if not pids:  # between this writer's open of the old file and its lock: the first writer's whole takeover
            os.remove(lock)
            pids.append(held(out, "--out", "sr3 prepare"))
        return real_flock(descriptor, operation)

    with pytest.MonkeyPatch.context() as patches:
        patches.setattr(os, "open", another_users_lock_file)
        patches.setattr(output_lock.fcntl, "flock", first_writer_takes_over_meanwhile)
        with pytest.raises(OutputFolderBusyError) as refused:
            with claim_output_folder(str(out), "--out", "sr3 prepare"):
                pytest.fail("two writers hold one folder")
    assert str(refused.value) == (
        f"{out} is being written by another sr3 prepare (pid {pids[0]}); wait for it or choose another --out"
    )
    assert lock.read_text(encoding="utf-8") == f"{pids[0]}\nsr3 prepare\n"


def prepared_below(tmp_path, capsys, name="datasets"):
    """`sr3 prepare` of 2 images into `<name>/out` (sizes 8,16) beside a plain photo folder `<name>/photos`."""
    source = make_image_folder(str(tmp_path / "images"), count=2, size=(48, 48), bad=False)
    out = tmp_path / name / "out"
    assert prepare(source, out, "--sizes", "8,16") == 0
    make_image_folder(str(tmp_path / name / "photos"), count=2, size=(16, 16), bad=False)
    capsys.readouterr()
    return source, out


def refused_upscale(inputs, output, capsys):
    from diffusers_sr3.cli import main

    assert main(["upscale", *map(str, inputs), "--output", str(output)]) == 2
    return capsys.readouterr().err


def test_an_upscale_or_eval_of_a_folder_holding_a_dataset_being_prepared_is_refused(tmp_path, held, capsys):
    """`sr3 upscale datasets/` (or a glob below it) while `sr3 prepare --out datasets/out` ran read the half-written
    dataset: only the folder given and its parent were held. The listing holds each dataset it meets."""
    from diffusers_sr3.cli import main

    _, out = prepared_below(tmp_path, capsys)
    pid = held(out, "--out", "sr3 prepare")
    busy = (
        f"folder {out} is still being written by sr3 prepare (pid {pid}): upscaling it now would read a half-written "
        "dataset; wait for the prepare to finish\n"
    )
    datasets = tmp_path / "datasets"
    for inputs in ([datasets], [datasets / "**" / "*.png"], [datasets / "*" / "lr_8" / "*.png"]):
        assert refused_upscale(inputs, tmp_path / "sr", capsys) == f"sr3 upscale: error: {busy}"
    assert not (tmp_path / "sr").exists()
    assert main(["eval", "--hr", str(datasets), "--sr", str(tmp_path / "images")]) == 2
    assert capsys.readouterr().err == "sr3 eval: error: " + busy.replace("upscaling it", "evaluating it")


def test_a_dataset_below_a_folder_read_is_held_until_the_read_ends_and_other_folders_stay_unlocked(
    tmp_path, held, monkeypatch, capsys
):
    """A prepare into a dataset below the folder an upscale reads is refused while it reads; the plain folders beside
    it, and a training run's own folder (which it may be writing), get no lock and are not refused."""
    import diffusers_sr3.commands.upscale as upscale_command

    source, out = prepared_below(tmp_path, capsys)
    run = tmp_path / "datasets" / "run"
    held(run)  # a training run writing its folder below the input: read unlocked, as a folder given
    real_plan_writes, statuses = upscale_command._plan_writes, []

    def plan_preparing(inputs, output):
        real_plan_writes(inputs, output)
        statuses.append(prepare(source, out, "--sizes", "8,16", "--overwrite"))
        raise ValueError("stopped before the model")

    monkeypatch.setattr(upscale_command, "_plan_writes", plan_preparing)
    assert refused_upscale([tmp_path / "datasets"], tmp_path / "sr", capsys) == (
        f"sr3 prepare: error: {out} is being read as training or evaluation data (pid {os.getpid()}); wait for that "
        "to end or choose another --out\nsr3 upscale: error: stopped before the model\n"
    )
    assert statuses == [2]
    assert LOCK_FILE not in os.listdir(tmp_path / "datasets" / "photos")
    assert LOCK_FILE not in os.listdir(tmp_path / "datasets")
    assert prepare(source, out, "--sizes", "8,16", "--overwrite") == 0  # released with the upscale


def test_a_dataset_whose_prepare_stopped_below_a_folder_read_is_refused(tmp_path, capsys):
    from diffusers_sr3.commands.prepare import STATE_FILE

    _, out = prepared_below(tmp_path, capsys)
    record = json.loads((out / STATE_FILE).read_text(encoding="utf-8"))
    (out / STATE_FILE).write_text(json.dumps({**record, "complete": False}), encoding="utf-8")
    error = refused_upscale([tmp_path / "datasets"], tmp_path / "sr", capsys)
    assert error.startswith(f"sr3 upscale: error: folder {out} holds a dataset that sr3 prepare did not finish (")


def test_a_dataset_read_through_a_link_is_held_as_the_prepare_into_it_holds_it(tmp_path, held, monkeypatch, capsys):
    """A link to `OUT/lr_8` (or to one of its files, or a folder of such links) was read while `sr3 prepare` wrote OUT:
    the parent held was the link's. The reader resolves links and locks OUT's lock file, the one the prepare takes."""
    _, out = prepared_below(tmp_path, capsys)
    links = tmp_path / "links"
    os.makedirs(links / "files")
    os.symlink(out / "lr_8", links / "lr_8")
    os.symlink(out / "hr_16", links / "hr_16")
    first = sorted(os.listdir(out / "lr_8"))[0]
    os.symlink(out / "lr_8" / first, links / "files" / first)
    pid = held(out, "--out", "sr3 prepare")
    busy = f"is still being written by sr3 prepare (pid {pid}): upscaling it now would read a half-written dataset"
    for inputs in (
        [links / "lr_8"],
        [links / "files"],
        [links / "files" / first],
        [links / "files" / "*.png"],
        [out / "lr_8" / first],  # a file of the dataset given directly is held as a link to it is
    ):
        error = refused_upscale(inputs, tmp_path / "sr", capsys)
        assert error.startswith("sr3 upscale: error: ") and f"{out} {busy}" in error, inputs
    config = TrainingConfig(**fast_options(tmp_path / "train", train_data_dir=str(links / "hr_16"), resolution=16))
    with pytest.raises(OutputFolderBusyError, match=rf"--train_data_dir {out} is still being written .*\(pid {pid}\)"):
        train(config)
    assert not (tmp_path / "train").exists()


def test_a_training_run_on_a_folder_or_pattern_holding_a_dataset_being_prepared_is_refused(tmp_path, held, capsys):
    """`--train_data_dir datasets/`, `--dataset_name datasets/` and `--train_data_files "datasets/*/data/*.parquet"`
    read a dataset below them that `sr3 prepare` was writing (the last two are listed by `datasets`, not the run)."""
    source, out = prepared_below(tmp_path, capsys)
    parquet = tmp_path / "datasets" / "parquet"
    assert prepare(source, parquet, "--sizes", "8,16", "--format", "parquet") == 0
    capsys.readouterr()
    datasets = str(tmp_path / "datasets")
    pids = {dataset: held(dataset, "--out", "sr3 prepare") for dataset in (out, parquet)}
    for dataset, options in (
        (out, {"train_data_dir": datasets}),
        (out, {"dataset_name": datasets}),
        (parquet, {"train_data_files": [str(tmp_path / "datasets" / "*" / "data" / "*.parquet")]}),
    ):
        assert_training_refused(tmp_path / "run", dataset, pids[dataset], **options)


# A writer caught between locking the lock file and recording itself in it: one taking over another user's file
# (which it cannot write) removes it and locks its own; any other writes its record into the file it holds.
UNRECORDED_WRITER = (
    "import fcntl, os, sys\n"
    "path, how = sys.argv[1:]\n"
    "old = os.open(path, os.O_RDWR if how == 'write' else os.O_RDONLY)\n"
    "fcntl.flock(old, fcntl.LOCK_EX)\n"
    "if how == 'removed':\n"
    "    os.remove(path)\n"
    "print('locked', flush=True); sys.stdin.readline()\n"
    "if how == 'take over':\n"
    "    os.remove(path)\n"
    "new = old if how == 'write' else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)\n"
    "fcntl.flock(new, fcntl.LOCK_EX); os.ftruncate(new, 0)\n"
    "os.pwrite(new, f'{os.getpid()}\\nsr3 prepare\\n'.encode('ascii'), 0)\n"
    "print('recorded', flush=True); sys.stdin.read()\n"
)


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="the holder is told from Linux's /proc/locks")
@pytest.mark.parametrize(
    "previous, how", [("4242\ntraining run\n", "take over"), ("", "write"), ("4242\ntraining run\n", "removed")]
)
def test_a_reader_is_not_let_in_by_the_record_of_a_lock_files_previous_holder(
    tmp_path, monkeypatch, capsys, previous, how
):
    """A reader refused the lock read the holder from the file: in the moment a prepare had locked it but not yet
    written its record (or held another user's file to take it over, which it never writes), the record was the
    previous holder's (a training run, or an empty file a reader made), and the reader read the dataset unlocked
    while the prepare wrote it; and in the moment the taking writer had removed the old file and not made its own,
    a reader of another user found no lock file. A record that is not the holder's (/proc/locks) is read again once
    it is, and a missing lock file of a prepare's dataset is looked for again."""
    import time

    _, out = prepared_below(tmp_path, capsys)
    (out / LOCK_FILE).write_text(previous, encoding="utf-8")
    writer = subprocess.Popen(
        [sys.executable, "-c", UNRECORDED_WRITER, str(out / LOCK_FILE), how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline() == "locked\n"
    waits = []

    def writer_goes_on(seconds):  # the reader waits: the writer records itself (or takes the file) meanwhile
        if not waits:
            writer.stdin.write("go\n")
            writer.stdin.flush()
            assert writer.stdout.readline() == "recorded\n"
        waits.append(seconds)

    monkeypatch.setattr(time, "sleep", writer_goes_on)
    owner = os.stat(out).st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)  # another user's reader: it creates no lock file there
    try:
        with pytest.raises(OutputFolderBusyError) as refused:
            with hold_for_reading(str(out), "--train_data_dir"):
                pytest.fail("read a dataset a prepare holds")
        assert str(refused.value).startswith(
            f"--train_data_dir {out} is still being written by sr3 prepare (pid {writer.pid})"
        )
        assert len(waits) == 1
    finally:
        monkeypatch.undo()
        writer.stdin.close()
        writer.wait(timeout=30)


def test_a_training_run_whose_datasets_listing_is_below_train_data_dir_holds_the_datasets_there(
    tmp_path, held, monkeypatch, capsys
):
    """`datasets` lists `--train_data_dir` as the `data_dir` of a builder's `--dataset_name` (`imagefolder`) and of
    `--train_data_files` patterns, which it reads relative to it: the run listed the folder only when streamed, and
    the patterns relative to the working folder, and read a dataset below it that `sr3 prepare` was writing."""
    source, out = prepared_below(tmp_path, capsys)
    datasets = str(tmp_path / "datasets")
    monkeypatch.chdir(tmp_path / "images")  # the pattern names nothing here

    def refused(dataset, pid, **options):
        assert_training_refused(tmp_path / "run", dataset, pid, **options)

    refused(out, held(out, "--out", "sr3 prepare"), dataset_name="imagefolder", train_data_dir=datasets)
    parquet = tmp_path / "parquets" / "parquet"
    assert prepare(source, parquet, "--sizes", "8,16", "--format", "parquet") == 0
    capsys.readouterr()
    pid = held(parquet, "--out", "sr3 prepare")
    pattern = os.path.join("*", "data", "*.parquet")
    refused(parquet, pid, train_data_dir=str(tmp_path / "parquets"), train_data_files=[pattern])


HOLD_MANY = (
    "import resource, sys\n"
    "from diffusers_sr3.image_io import find_image_sources\n"
    "from diffusers_sr3.training.output_lock import hold_folders_for_reading\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
    "with hold_folders_for_reading([], 'upscaling it'):\n"
    "    find_image_sources([sys.argv[1]])\n"
)


def test_more_datasets_read_than_open_files_allowed_is_an_error_that_says_so(tmp_path):
    """Each prepared dataset a listing meets keeps its lock open while it is read: past the limit of open files one
    was read unlocked, and a glob's listing then failed without a word (`no such file, folder or matching glob`)."""
    for index in range(80):
        dataset = tmp_path / "datasets" / f"{index:03d}"
        (dataset / "lr_8").mkdir(parents=True)
        (dataset / "lr_8" / "0.png").write_bytes(b"")
        (dataset / ".sr3_prepare.json").write_text('{"complete": true}', encoding="utf-8")
        (dataset / LOCK_FILE).write_text("", encoding="utf-8")
    listing = str(tmp_path / "datasets" / "*" / "lr_8" / "*.png")
    ran = subprocess.run([sys.executable, "-c", HOLD_MANY, listing, "64"], capture_output=True, text=True)
    assert ran.returncode == 1
    error = ran.stderr.strip().splitlines()[-1]
    assert error.startswith(f"OSError: [Errno {errno.EMFILE}] cannot hold folder {tmp_path / 'datasets'}"), error
    assert error.endswith("read fewer datasets at once, or raise the limit (ulimit -n)"), error
    assert subprocess.run([sys.executable, "-c", HOLD_MANY, listing, "512"]).returncode == 0


def test_a_training_run_on_a_hub_dataset_leaves_the_working_folders_datasets_alone(tmp_path, held, monkeypatch, capsys):
    """The `--train_data_dir` and relative `--train_data_files` of a Hub `--dataset_name` are paths in its repo: read
    in the working folder, they held the datasets there, and an `sr3 prepare` writing one refused a run that never
    reads it."""
    source, out = prepared_below(tmp_path, capsys)
    held(out, "--out", "sr3 prepare")
    monkeypatch.chdir(tmp_path / "datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    options = fast_options(tmp_path / "run", resolution=16, dataset_name="someone/faces")
    for repo_paths in ({"train_data_files": [os.path.join("out", "hr_16", "*.png")]}, {"train_data_dir": "out"}):
        with pytest.raises(ConnectionError, match="'someone/faces' needs the Hugging Face Hub, but offline mode"):
            train(TrainingConfig(**options, **repo_paths))


def assert_training_refused(output, dataset, pid, **options):
    """A training run into `output` with `options` is refused, naming `dataset` that prepare `pid` is writing, before
    it makes `output`."""
    with pytest.raises(OutputFolderBusyError) as refusal:
        train(TrainingConfig(**fast_options(output, resolution=16, **options)))
    assert str(refusal.value) == (
        f"folder {dataset} is still being written by sr3 prepare (pid {pid}): training on it now would read a "
        "half-written dataset; wait for the prepare to finish"
    ), options
    assert not output.exists()
