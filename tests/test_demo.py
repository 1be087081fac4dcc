"""`sr3 demo` end to end with a tiny step count: packaged photos, training core, held-out evaluation, pictures."""

import json
import math
import os
import time

import PIL.Image
import pytest
import torch
from conftest import low_resolution_unet, needs_bfloat16_kernels

from diffusers_sr3 import SR3Pipeline, backends, make_scheduler, metrics
from diffusers_sr3.cli import main
from diffusers_sr3.commands import demo
from diffusers_sr3.image_processing import images_to_tensor, upsample_condition
from diffusers_sr3.photos import study_crops
from diffusers_sr3.pretrained import DEFAULT_DETAIL_OPTIONS
from diffusers_sr3.training.trainer import SUMMARY_FILE


def test_demo_trains_and_reports_on_held_out_photos(tmp_path, capsys, monkeypatch):
    # What each method is given: SR3's low-resolution input, and the arguments of every evaluation.
    sr3_inputs, sr3_options, evaluated = [], [], []
    real_call, real_evaluate = SR3Pipeline.__call__, metrics.evaluate_batch
    monkeypatch.setattr(
        SR3Pipeline,
        "__call__",
        lambda self, image, **kw: sr3_inputs.append(image) or sr3_options.append(kw) or real_call(self, image, **kw),
    )
    monkeypatch.setattr(metrics, "evaluate_batch", lambda *a: evaluated.append(a) or real_evaluate(*a))
    out = tmp_path / "demo"
    arguments = ["demo", "--output", str(out), "--steps", "2", "--width", "8", "--crop-size", "32"]
    arguments += ["--train-crops", "16", "--eval-crops", "2", "--inference-steps", "2", "--photo-size", "40"]
    assert main(arguments + ["--batch-size", "4"]) == 0
    # SR3 and bicubic start from the same 8-bit low-resolution pixels (SR3 takes pictures, uint8).
    sr3_low = images_to_tensor(next(image for image in sr3_inputs if isinstance(image, list)))  # the held-out crops
    (bicubic, hr, bicubic_lr), (_, _, sr3_lr) = evaluated[-5:-3]  # the demo's own: bicubic, then SR3
    assert torch.equal(bicubic_lr, sr3_low) and torch.equal(sr3_lr, sr3_low)
    assert torch.equal(bicubic, upsample_condition(sr3_low, tuple(hr.shape[-2:])))
    printed = capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert report["steps"] == 2
    assert not set(report["train_photos"]) & set(report["heldout_photos"])
    # Both modes of the model trained here and of the one that ships in the package.
    methods = {"bicubic"} | {f"{name} {mode}" for name in ("SR3", demo.PACKAGED) for mode in ("fidelity", "detail")}
    assert set(report["mean"]) == methods
    for method in methods:
        assert set(report["per_image"][method]) == {"psnr", "ssim", "consistency"}
        assert all(len(values) == 2 for values in report["per_image"][method].values())
        assert all(math.isfinite(value) for value in report["mean"][method].values())
    # Bicubic on real photo crops is a sane baseline; the verdict states what was measured.
    assert 15 < report["mean"]["bicubic"]["psnr"] < 45
    assert report["verdict"] in printed and report["verdict"] in (out / "metrics.md").read_text(encoding="utf-8")
    assert report["verdict"].startswith("The SR3 model trained here") and "fidelity mode" in report["verdict"]
    # LR | bicubic | SR3 fidelity | SR3 detail | packaged fidelity | packaged detail | HR per row, magnified x2
    assert PIL.Image.open(out / "comparison.png").size == (7 * 64, 2 * 64)
    # A whole held-out photo (longer side 40, larger than the 32x32 the model was trained at).
    photo = PIL.Image.open(out / "photo.png")
    assert photo.width % 7 == 0 and max(photo.width // 7, photo.height) == 40
    assert (out / "model" / "model_index.json").is_file()
    # The trained model is a normal pipeline folder: `sr3 upscale` takes it.
    assert (
        main(
            ["upscale", str(out / "comparison.png"), "--model", str(out / "model"), "--steps", "1"]
            + ["--output", str(tmp_path / "up.png")]
        )
        == 0
    )
    assert PIL.Image.open(tmp_path / "up.png").size == (4 * 7 * 64, 4 * 2 * 64)
    # Detail mode runs with the packaged model's detail settings (DDIM eta 1, from the fidelity answer).
    details = [kw for kw in sr3_options if kw.get("mode") == "detail"]
    assert details and all(kw["eta"] == 1.0 and kw["strength"] == DEFAULT_DETAIL_OPTIONS["strength"] for kw in details)
    # ... which the saved model keeps, with the sampler they were measured with.
    saved = SR3Pipeline.load_config(out / "model")
    assert (saved["detail_steps"], saved["detail_eta"], saved["detail_strength"]) == (2, 1.0, 0.6)
    assert saved["fidelity_steps"] == demo.DEMO_FIDELITY_STEPS == 4  # a model trained for minutes gains from them
    assert "4 steps for the model trained here, 1 for the packaged one" in (out / "metrics.md").read_text(
        encoding="utf-8"
    )
    assert saved["scheduler"] == ["diffusers", "DDIMScheduler"]
    # An existing demo is not overwritten silently.
    assert main(arguments) == 2
    capsys.readouterr()
    assert main(arguments + ["--strength", "1.5"]) == 2
    assert "--strength must lie in (0, 1], got 1.5" in capsys.readouterr().err


def test_demo_self_ensemble_adds_a_fidelity_column(tmp_path):
    out = tmp_path / "demo"
    arguments = ["demo", "--output", str(out), "--steps", "1", "--width", "8", "--crop-size", "32", "--no-packaged"]
    arguments += ["--train-crops", "8", "--eval-crops", "2", "--inference-steps", "2", "--photo-size", "32"]
    assert main(arguments + ["--batch-size", "2", "--self-ensemble"]) == 0
    report = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert list(report["mean"]) == ["bicubic", "SR3 fidelity", "SR3 fidelity (self-ensemble)", "SR3 detail"]
    assert report["mean"]["SR3 fidelity (self-ensemble)"] != report["mean"]["SR3 fidelity"]
    assert "averaged over the input's 8 flips and quarter-turns" in (out / "metrics.md").read_text(encoding="utf-8")
    # LR | bicubic | SR3 fidelity | SR3 fidelity (self-ensemble) | SR3 detail | HR per row, magnified x2
    assert PIL.Image.open(out / "comparison.png").size == (6 * 64, 2 * 64)
    assert PIL.Image.open(out / "photo.png").width % 6 == 0


def test_demo_prints_its_results_on_stdout_and_its_progress_on_stderr_or_none_with_quiet(tmp_path, capsys):
    out = tmp_path / "demo"
    arguments = ["demo", "--output", str(out), "--steps", "1", "--width", "8", "--crop-size", "32", "--no-packaged"]
    arguments += ["--train-crops", "8", "--eval-crops", "2", "--inference-steps", "2", "--photo-size", "32"]
    arguments += ["--batch-size", "2", "--threads", "1"]
    assert main(arguments) == 0
    printed = capsys.readouterr()
    verdict = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["verdict"]
    results = printed.out.splitlines()
    assert results[-1] == f"wrote comparison.png, photo.png, metrics.md, metrics.json and the model to {out}"
    assert verdict in results and "| bicubic |" in printed.out
    # How the run went (the photos, the training's bar and summary) is progress: on stderr.
    for progress in ("training photos (", "held-out photos (", "steps:", "Training finished"):
        assert progress in printed.err and progress not in printed.out, progress
    assert main(arguments + ["--overwrite", "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == ""
    assert f"removed the earlier demo's model in {out / 'model'}" in quiet.out  # the user's files changed: said
    assert [line for line in quiet.out.splitlines() if not line.startswith("removed")] == results


def test_verdict_states_what_was_measured_in_plain_words():
    bicubic = {"psnr": 25.0, "ssim": 0.7, "consistency": 1e-4}
    assert demo._verdict({"psnr": 26.0, "ssim": 0.8, "consistency": 5e-5}, bicubic, "The model") == (
        "The model beats bicubic in fidelity mode: +1.00 dB PSNR, and better SSIM and consistency."
    )
    assert "does not beat bicubic" in demo._verdict({"psnr": 20.0, "ssim": 0.5, "consistency": 1e-3}, bicubic, "It")
    assert demo._verdict({"psnr": 24.0, "ssim": 0.75, "consistency": 1e-3}, bicubic, "It") == (
        "It beats bicubic in fidelity mode on SSIM only (-1.00 dB PSNR)."
    )


def test_the_verdict_compares_the_crops_where_both_psnrs_are_finite():
    # The first crop is perfectly flat: bicubic reproduces it exactly (PSNR inf), which made the plain mean inf.
    bicubic = {"psnr": [math.inf, 20.0, 21.0], "ssim": [1.0, 0.5, 0.6], "consistency": [0.0, 3e-5, 2e-5]}
    sr3 = {"psnr": [60.0, 39.0, 40.0], "ssim": [1.0, 0.9, 0.95], "consistency": [1e-6, 1e-6, 2e-6]}
    verdict = demo._verdicts({"bicubic": bicubic, "SR3 fidelity": sr3})
    assert verdict == (
        "The SR3 model trained here beats bicubic in fidelity mode: +19.00 dB PSNR, and better SSIM and consistency "
        "(1 crop(s) with an infinite PSNR left out)."
    )
    # No crop left to compare, or a metric that is not a number: no judgement, rather than a wrong one.
    flat = {name: values[:1] for name, values in bicubic.items()}
    assert demo._verdicts({"bicubic": flat, "SR3 fidelity": {name: v[:1] for name, v in sr3.items()}}) == (
        "The SR3 model trained here cannot be judged against bicubic in fidelity mode: a mean is not finite "
        "(1 crop(s) with an infinite PSNR left out)."
    )
    nan = {"psnr": math.nan, "ssim": math.nan, "consistency": math.nan}
    means = {"psnr": 25.0, "ssim": 0.7, "consistency": 2e-5}
    assert (
        demo._verdict(nan, means, "It") == "It cannot be judged against bicubic in fidelity mode: a mean is not finite."
    )
    assert "cannot be judged" in demo._verdict(dict(means, consistency=math.nan), means, "It")


def test_differences_the_table_does_not_show_are_ties():
    bicubic = {"psnr": 25.0, "ssim": 0.7, "consistency": 2e-5}
    near = {"psnr": 25.004, "ssim": 0.70004, "consistency": 1.9996e-5}
    table = demo._table({"bicubic": bicubic, "SR3 fidelity": near})
    assert table[2].split("|")[2:] == table[3].split("|")[2:]  # the same numbers printed
    assert demo._verdict(near, bicubic, "It") == (
        "It does not beat bicubic in fidelity mode at this training budget (+0.00 dB); train longer."
    )
    # A difference the table shows in one metric is a win in that one only.
    assert demo._verdict(dict(near, ssim=0.7001), bicubic, "It") == (
        "It beats bicubic in fidelity mode on SSIM only (+0.00 dB PSNR)."
    )


def test_the_packaged_models_verdict_gives_no_training_advice():
    bicubic = {"psnr": [25.0, 26.0], "ssim": [0.7, 0.8], "consistency": [2e-5, 2e-5]}
    worse = {"psnr": [24.0, 25.0], "ssim": [0.6, 0.7], "consistency": [3e-5, 3e-5]}
    results = {"bicubic": bicubic, "SR3 fidelity": worse, f"{demo.PACKAGED} fidelity": worse}
    busy = demo._busy_note(60, 1995, threads=1)
    assert demo._verdicts(results) == (
        "The SR3 model trained here does not beat bicubic in fidelity mode at this training budget (-1.00 dB); "
        "train longer. The packaged model does not beat bicubic in fidelity mode (-1.00 dB)."
    )
    assert demo._verdicts(results, busy) == (
        f"The SR3 model trained here does not beat bicubic in fidelity mode (-1.00 dB). {busy} "
        "The packaged model does not beat bicubic in fidelity mode (-1.00 dB)."
    )


def _run_timed_demo(monkeypatch, out, *extra, minutes, timed_step, bfloat16):
    """`sr3 demo` of a tiny network for `minutes`, its step timed at `timed_step` seconds whatever it really takes."""
    monkeypatch.setattr(demo, "_seconds_per_step", lambda config, batch_size, bfloat16: timed_step)
    monkeypatch.setattr(backends, "fast_bfloat16", lambda device: bfloat16)  # `sr3 demo` imports it when it runs
    arguments = ["demo", "--output", str(out), "--minutes", str(minutes), "--width", "4", "--crop-size", "32"]
    arguments += ["--train-crops", "8", "--eval-crops", "1", "--inference-steps", "2", "--photo-size", "32"]
    assert main(arguments + ["--batch-size", "2", *extra]) == 0


@needs_bfloat16_kernels
def test_minutes_size_the_run_from_a_timed_step(tmp_path, monkeypatch, capsys):
    pytest.importorskip("skimage")
    for bfloat16 in (False, True):
        measured = demo._seconds_per_step(demo.unet_config(32, 4), batch_size=2, bfloat16=bfloat16)
        assert 0 < measured < 60
    assert demo.unet_config(64, 32)["pixel_unshuffle_factor"] == 4  # the network runs at the low-resolution grid
    out = tmp_path / "demo"
    _run_timed_demo(monkeypatch, out, minutes=0.13, timed_step=0.5, bfloat16=True)  # bf16 where that is fast
    # 0.13 min = 7.8 s at 0.5 s per step, x0.8 -> a plan of 12 steps, which these tiny steps finish early
    assert "training for 0.13 min (at most 12 steps)" in capsys.readouterr().err  # progress, not a result
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["steps"] >= 12
    assert "| mixed precision | bf16 |" in (out / "model" / "README.md").read_text(encoding="utf-8")


def test_a_run_timed_on_a_busy_machine_goes_on_for_its_minutes(tmp_path, monkeypatch, capsys):
    # The timed step says 100 s (a plan of 10 steps, the least); the real steps are far faster, so the run resumes
    # from its checkpoint and trains on until the clock, and no training state is left in the model folder.
    out = tmp_path / "demo"
    stale = out / "model" / "checkpoint-99999"  # left by an interrupted earlier demo in the same folder
    stale.mkdir(parents=True)
    (stale / "training_state.json").write_text("{}", encoding="utf-8")
    (out / "model" / "model_index.json").write_text(
        "{}", encoding="utf-8"
    )  # ... and a finished one's pipeline, which no run trains over
    _run_timed_demo(monkeypatch, out, "--no-packaged", "--overwrite", minutes=0.25, timed_step=100.0, bfloat16=False)
    report = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert report["steps"] > 10
    assert report["training_seconds"] > 0.9 * 0.25 * 60
    summary = json.loads((out / "model" / SUMMARY_FILE).read_text(encoding="utf-8"))
    assert summary["resumed_from"] is not None and summary["global_step"] == report["steps"]
    assert summary["checkpoints"] == []
    assert not [path.name for path in (out / "model").iterdir() if path.name.startswith("checkpoint")]
    assert f"removed the earlier demo's model in {out / 'model'}" in capsys.readouterr().out
    assert SR3Pipeline.from_pretrained(str(out / "model")).unet is not None


def test_the_clock_stops_a_slower_than_estimated_run(tmp_path, monkeypatch):
    # The estimate says 0.001 s per step (a plan of 480 steps for 0.6 s); the real steps are slower: the clock wins.
    out = tmp_path / "demo"
    _run_timed_demo(monkeypatch, out, "--no-packaged", minutes=0.01, timed_step=0.001, bfloat16=False)
    report = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert 1 <= report["steps"] < 480
    assert report["training_seconds"] < 30
    assert "| mixed precision | no |" in (out / "model" / "README.md").read_text(encoding="utf-8")


def test_a_detail_setting_that_runs_no_step_is_refused_before_training(tmp_path):
    from diffusers_sr3.cli import main

    started = time.perf_counter()
    # strength 0.3 of 3 steps is int(0.9) = 0 steps, as Diffusers' image-to-image counts them
    code = main(["demo", "--output", str(tmp_path / "demo"), "--inference-steps", "3", "--strength", "0.3"])
    assert code == 2 and time.perf_counter() - started < 30 and not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    "option, message",
    [
        (["--photo-size", "0"], "argument --photo-size: must be at least 1, got 0"),
        (["--photo-size", "-5"], "argument --photo-size: must be at least 1, got -5"),
        (["--threads", "-1"], "argument --threads: must be at least 1, got -1"),
        (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["--width", "0"], "argument --width: must be at least 1, got 0"),
        (["--train-crops", "0"], "argument --train-crops: must be at least 1, got 0"),
        (["--seed", "-1"], f"argument --seed: must be from 0 to {2**32 - 1}, got -1"),
    ],
)
def test_out_of_range_options_are_named_before_any_work(tmp_path, capsys, option, message):
    with pytest.raises(SystemExit) as stopped:
        main(["demo", "--output", str(tmp_path / "demo"), *option])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    "option, message",
    [(["--minutes", text], f"--minutes must be a positive number, got {text}") for text in ("inf", "nan", "-1", "0")]
    + [(["--width", text], f"--width must be 2, 4, 6 or a multiple of 8, got {text}") for text in ("3", "12")],
)
def test_settings_the_run_cannot_use_are_refused_before_any_work(tmp_path, capsys, option, message):
    assert main(["demo", "--output", str(tmp_path / "demo"), *option]) == 2
    assert capsys.readouterr().err == f"sr3 demo: error: {message}\n"
    assert not (tmp_path / "demo").exists()


def test_a_photo_size_too_small_to_downscale_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "_train", lambda *args: pytest.fail("trained before checking --photo-size"))
    arguments = ["demo", "--output", str(tmp_path / "demo"), "--train-crops", "4", "--eval-crops", "1"]
    assert main(arguments + ["--photo-size", "3"]) == 2
    # The error is the last line, after the notes the run printed as it started (the CPU threads it takes).
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("sr3 demo: error: --photo-size 3 makes the held-out photo")
    # The size named is the least that works for this photo.
    least = int(error.split("give at least ")[1])
    heldout = study_crops(32, 1, 1).heldout_photos[0]
    assert min(demo._whole_photo(heldout, least).size) == demo.UPSCALE_FACTOR
    with pytest.raises(ValueError, match=f"--photo-size {least - 1} makes"):
        demo._whole_photo(heldout, least - 1)


def test_a_model_folder_in_the_output_is_kept_without_overwrite(tmp_path, capsys):
    from diffusers_sr3.cli import main

    kept = tmp_path / "demo" / "model" / "diffusion_pytorch_model.safetensors"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"someone's weights")
    assert main(["demo", "--output", str(tmp_path / "demo"), "--steps", "1"]) == 2
    assert "already holds a demo (or a model folder); pass --overwrite" in capsys.readouterr().err
    assert kept.read_bytes() == b"someone's weights"


def test_a_run_the_busy_machine_cut_short_says_so_instead_of_train_longer(tmp_path, monkeypatch, capsys):
    before = torch.get_num_threads()
    monkeypatch.setattr(backends, "TORCH_THREADS_AT_START", 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(backends, "runnable_tasks_besides_this_one", lambda: 6)  # other processes hold both cores
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    out = tmp_path / "demo"
    try:
        # A plan of 4800 steps for 0.6 s: the clock stops it far short, as a busy machine's slow steps do.
        _run_timed_demo(monkeypatch, out, "--no-packaged", minutes=0.01, timed_step=0.0001, bfloat16=False)
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    printed = capsys.readouterr().err  # a note: on stderr, as every command's notes
    assert threads == 1 and "1 CPU thread(s) for torch: other processes keep the cores busy" in printed
    report = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    planned = int(demo.PLAN_SHARE * 0.01 * 60 / 0.0001)
    assert report["planned_steps"] == planned and report["steps"] < planned / 2 and report["cpu_threads"] == 1
    busy = f"The machine was busy: training reached {report['steps']} of its {planned} planned steps (rerun on an "
    busy += "idle machine)."
    assert report["verdict"].endswith(busy) and "train longer" not in report["verdict"]
    assert busy in (out / "metrics.md").read_text(encoding="utf-8")


def test_the_busy_note_replaces_the_advice_to_train_longer():
    bicubic = {"psnr": 25.0, "ssim": 0.7, "consistency": 1e-4}
    worse = {"psnr": 24.77, "ssim": 0.6, "consistency": 1e-3}
    assert demo._busy_note(60, 1995, threads=2) == (
        "The machine was busy: training reached 60 of its 1995 planned steps (rerun on an idle machine or with "
        "--threads 1)."
    )
    assert demo._busy_note(998, 1995, threads=2) is None  # half the plan: the step timing was only off
    assert demo._busy_note(5, None, threads=2) is None  # --steps: no plan by the clock
    busy = demo._busy_note(60, 1995, threads=2)
    assert demo._verdict(worse, bicubic, "It", busy) == f"It does not beat bicubic in fidelity mode (-0.23 dB). {busy}"
    assert demo._verdict(worse, bicubic, "It").endswith("at this training budget (-0.23 dB); train longer.")
    better = {"psnr": 26.0, "ssim": 0.8, "consistency": 5e-5}
    assert demo._verdict(better, bicubic, "It", busy).endswith(f"better SSIM and consistency. {busy}")


def test_the_demo_models_card_names_its_fidelity_steps(tmp_path):
    from diffusers_sr3.model_card import write_pipeline_card

    for steps, cost in ((demo.DEMO_FIDELITY_STEPS, "4 deterministic DDIM steps"), (1, "one evaluation")):
        scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample")
        pipeline = SR3Pipeline(low_resolution_unet(), scheduler, upscale_factor=4, fidelity_steps=steps)
        pipeline.save_pretrained(tmp_path / str(steps))
        card = open(write_pipeline_card(str(tmp_path / str(steps)), pipeline, "me/x"), encoding="utf-8").read()
        assert f"highest PSNR, no invented texture, {cost}\n" in card
    # The demo's own model is saved with its steps by the training core, which writes its card.
    out = tmp_path / "demo"
    arguments = ["demo", "--output", str(out), "--steps", "1", "--width", "4", "--crop-size", "32", "--no-packaged"]
    arguments += ["--train-crops", "4", "--eval-crops", "1", "--inference-steps", "2", "--photo-size", "32"]
    assert main(arguments + ["--batch-size", "2", "--threads", str(torch.get_num_threads())]) == 0
    card = (out / "model" / "README.md").read_text(encoding="utf-8")
    assert "no invented texture, 4 deterministic DDIM steps" in card and "one evaluation" not in card
    assert SR3Pipeline.load_config(out / "model")["fidelity_steps"] == 4


def test_the_demo_holds_out_the_packaged_models_own_heldout_photos_whichever_are_installed():
    """The demo scores the packaged model too: on a machine with other photo packages, a quarter of the photos there
    would take photos it trained on (`china` with scikit-image, matplotlib and scikit-learn alone)."""
    installed = ["astronaut", "chelsea", "coffee", "china", "flower", "grace_hopper", "motorcycle_left", "rocket"]
    paths = [f"/photos/{name}.png" for name in installed]
    assert demo.demo_heldout(paths) == (["chelsea", "coffee"], None)
    heldout, note = demo.demo_heldout([path for path in paths if "chelsea" not in path and "coffee" not in path])
    assert heldout == 0.25 and "may include photos it trained on" in note
