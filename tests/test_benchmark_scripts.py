"""The benchmark scripts measure what they say and fail early and cleanly: tiny data, the slow parts replaced."""

import argparse
import importlib.util
import json
import math
import re

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import REPO

from diffusers_sr3.image_processing import degrade, upsample_condition
from diffusers_sr3.metrics import image_quality, quantize


def load(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def x0_model_dir(tmp_path, tiny_unet):
    """A tiny residual pipeline that predicts the clean image (fidelity mode needs one), saved to a folder."""
    from diffusers_sr3 import SR3Pipeline, make_scheduler

    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample_range=4.0)
    pipeline = SR3Pipeline(tiny_unet, scheduler, upscale_factor=4, residual=True, residual_scale=2.0)
    pipeline.save_pretrained(tmp_path / "x0-model")
    return tmp_path / "x0-model"


def test_recipe_study_scores_fidelity_at_the_steps_of_its_tables_and_pictures_few_crops(tmp_path, monkeypatch):
    from diffusers_sr3 import make_scheduler

    recipe_study = load("recipe_study")
    built, real = [], recipe_study.SR3Pipeline

    def pipeline(**kwargs):
        built.append(real(**kwargs))
        return built[-1]

    monkeypatch.setattr(recipe_study, "SR3Pipeline", pipeline)
    from conftest import tiny_unet_config

    torch.manual_seed(0)
    unet = recipe_study.SR3UNet2DModel(**tiny_unet_config()).eval()
    scheduler = make_scheduler("ddpm", prediction_type="sample", n_timestep=100)
    held = torch.rand(3, 3, 32, 32) * 2 - 1  # fewer evaluation crops than the picture's 48
    args = argparse.Namespace(detail_steps=1, report=str(tmp_path))
    outputs = recipe_study.evaluate(unet, scheduler, 1.0, held, args, "base")
    assert [p.config.fidelity_steps for p in built] == [recipe_study.FIDELITY_STEPS] == [4]
    assert set(outputs) == {"fidelity", "detail", "bicubic"} and (tmp_path / "base.png").is_file()


def test_recipe_study_merges_its_arms_into_an_earlier_report_of_the_same_settings(tmp_path, monkeypatch):
    recipe_study = load("recipe_study")
    monkeypatch.setattr(recipe_study, "photo_split", lambda paths, heldout: ([], []))
    monkeypatch.setattr(recipe_study, "photo_crops", lambda *args, **kwargs: torch.zeros(2, 3, 64, 64))
    runs = []

    def run_arm(name, cpu_seconds, args, held):
        runs.append(name)
        detail = dict(psnr_gain_db=len(runs), ssim_gain=0, edge_ratio=1, consistency_vs_bicubic=1)
        detail["two_seeds_differ_255"] = 1
        return dict(
            name=name,
            changes=name,
            steps=1,
            cpu_s_per_step=1,
            detail=detail,
            bicubic=dict(psnr=30, ssim=0.9, edge_ratio=0.6),
        )

    monkeypatch.setattr(recipe_study, "run_arm", run_arm)
    report = tmp_path / "report"
    recipe_study.main(["--arms", "base", "epsilon", "--report", str(report), "--cpu-minutes", "0.5"])
    (report / "results.json").write_text(
        json.dumps(dict(json.loads((report / "results.json").read_text(encoding="utf-8")), note="kept")),
        encoding="utf-8",
    )
    recipe_study.main(["--arms", "base", "width_32", "--report", str(report), "--cpu-minutes", "0.5"])
    results = json.loads((report / "results.json").read_text(encoding="utf-8"))
    # base rerun in place, epsilon kept, width_32 added; the settings and the note recorded.
    assert [(r["name"], r["detail"]["psnr_gain_db"]) for r in results["results"]] == [
        ("base", 3),
        ("epsilon", 2),
        ("width_32", 4),
    ]
    assert results["fidelity_steps"] == 4 and results["cpu_minutes"] == 0.5 and results["note"] == "kept"
    assert "| epsilon |" in (report / "results.md").read_text(encoding="utf-8")
    assert sorted(path.name for path in report.iterdir()) == ["results.json", "results.md"]
    with pytest.raises(SystemExit):
        recipe_study.main(["--arms", "base", "--report", str(report), "--cpu-minutes", "1"])
    assert len(runs) == 4  # refused before training


def test_compare_models_prints_the_reports_psnr_and_none_for_the_hr(tmp_path, x0_model_dir, monkeypatch, capsys):
    compare_models = load("compare_models")
    generator = torch.Generator().manual_seed(0)
    # Crops of very different difficulty: a pooled MSE and the mean of per-crop PSNRs disagree.
    hr = torch.cat([torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1, torch.full((2, 3, 32, 32), 0.1)])
    hr[2:] += 0.05 * torch.randn(2, 3, 32, 32, generator=generator)  # no crop reproduced exactly: no inf PSNR
    monkeypatch.setattr(compare_models, "heldout_crops", lambda *args, **kwargs: (hr, []))
    compare_models.main(
        ["--model", f"m={x0_model_dir}", "--rows", "2", "--steps", "1", "--output", f"{tmp_path}/c.png"]
    )
    lines = {line.split(":")[0].strip(): line for line in capsys.readouterr().out.splitlines() if "edge" in line}
    shown = compare_models.chosen_crops(hr, 2, flattest=True)
    lr = quantize(degrade(shown, 4)[0]).float() / 127.5 - 1
    bicubic = upsample_condition(lr, (32, 32)).clamp(-1, 1)
    assert f"PSNR {image_quality(bicubic, shown, lr)['psnr']:6.2f} dB" in lines["bicubic"]
    assert "PSNR" in lines["m"] and "PSNR" not in lines["HR"]


def test_output_formats_measures_the_real_pixels_not_the_mosaics_padding(tmp_path):
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)  # 2 x 2 mosaic: one tile of padding
    noisy = np.clip(hr.astype(int) + rng.integers(-20, 21, hr.shape), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "o.npz", **{"s/HR": hr, "s/bicubic": noisy})
    report = load("output_formats").main([str(tmp_path / "o.npz"), "--output", str(tmp_path / "r")])
    [png] = [row for row in report["rows"] if row["format"] == "PNG"]
    mse = np.mean((noisy.astype(float) - hr) ** 2)
    assert png["psnr"] == pytest.approx(10 * math.log10(255**2 / mse))


def test_training_launch_compares_with_the_one_thread_arm_wherever_it_ran(tmp_path, monkeypatch):
    training_launch = load("training_launch")
    speeds = {"default": 4.0, "one thread": 2.0}
    monkeypatch.setattr(training_launch, "write_photos", lambda folder, count: folder)
    monkeypatch.setattr(training_launch, "launch", lambda arm, *args: dict(cpu_threads=1, steps_per_second=speeds[arm]))
    common = ["--preset", "tiny", "--batch", "1", "--photos", "1"]
    report = training_launch.main(common + ["--arms", "default", "one thread", "--output", str(tmp_path / "a")])
    assert [row["speedup"] for row in report["rows"]] == [2.0, 1.0] and report["speedup_against"] == "one thread"
    assert "| vs one thread |" in (tmp_path / "a" / "training_launch.md").read_text(encoding="utf-8")
    report = training_launch.main(common + ["--arms", "default", "--output", str(tmp_path / "b")])
    assert report["rows"][0]["speedup"] == 1.0
    assert "| vs default |" in (tmp_path / "b" / "training_launch.md").read_text(encoding="utf-8")


def test_convergence_refuses_a_saved_model_trained_further_than_asked(tmp_path, capsys):
    convergence = load("convergence")
    (tmp_path / "training_summary.json").write_text(json.dumps(dict(global_step=3)), encoding="utf-8")
    with pytest.raises(SystemExit):
        convergence.parse_args(["--steps", "1", "3", "--output", str(tmp_path)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "trained for 3 steps, more than --steps 1" in error
    assert convergence.parse_args(["--steps", "3", "--output", str(tmp_path)]).steps == [3]


def test_convergence_rerun_on_a_finished_run_reports_the_earlier_runs_speed(tmp_path):
    convergence = load("convergence")
    output, report = tmp_path / "model", tmp_path / "report"
    argv = ["--steps", "2", "--crop-size", "16", "--width", "8", "--train-crops", "4", "--eval-crops", "1"]
    argv += ["--batch-size", "2"]
    argv += ["--inference-steps", "2", "--output", str(output), "--report", str(report)]
    assert convergence.main(argv) == 0
    [first] = json.loads((report / "results.json").read_text(encoding="utf-8"))["runs"]
    assert convergence.main(argv) == 0  # resumes at step 2 of 2: trains nothing
    assert json.loads((output / "training_summary.json").read_text(encoding="utf-8"))["steps_this_run"] == 0
    [again] = json.loads((report / "results.json").read_text(encoding="utf-8"))["runs"]
    assert again["seconds_per_step"] == first["seconds_per_step"] > 0 and again["final_loss"] == first["final_loss"]


def test_the_reports_evaluate_the_packaged_model_on_its_own_heldout_photos(tmp_path, x0_model_dir, monkeypatch):
    """A held-out fraction picks other photos where other photo packages are installed, some of them trained on."""
    from diffusers_sr3.photos import packaged_model_heldout
    from diffusers_sr3.pretrained import default_model_path

    model_report = load("model_report")
    assert model_report.heldout_photos(None, [x0_model_dir, default_model_path()]) == packaged_model_heldout()
    assert model_report.heldout_photos(None, [x0_model_dir]) == 0.25
    assert model_report.heldout_photos(0.5, [default_model_path()]) == 0.5
    compare_models = load("compare_models")
    asked = {}
    hr = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    monkeypatch.setattr(compare_models, "heldout_crops", lambda *args, **kwargs: asked.update(kwargs) or (hr, []))
    compare_models.main(
        ["--model", f"shipped={default_model_path()}", "--model", f"m={x0_model_dir}", "--rows", "1"]
        + ["--crop-size", "32", "--steps", "1", "--mode", "fidelity", "--output", f"{tmp_path}/c.png"]
    )
    assert asked["heldout"] == packaged_model_heldout()


def test_model_report_checks_the_faces_and_unseen_folders_before_evaluating(tmp_path, capsys):
    model_report = load("model_report")
    common = ["--model", str(tmp_path / "not-loaded-yet"), "--output", str(tmp_path / "report")]
    for option in ("--faces", "--unseen"):
        with pytest.raises(SystemExit):
            model_report.main(common + [option, str(tmp_path)])
        assert f"error: {option}: no " in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_training_throughput_refuses_to_time_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load("training_throughput").main(["--networks", "--output", str(tmp_path / "report")])
    assert "nothing to time" in capsys.readouterr().err and not (tmp_path / "report").exists()


def test_every_table_of_the_quality_notes_has_its_separator_line():
    lines = (REPO / "docs" / "quality.md").read_text(encoding="utf-8").splitlines()
    for number, (previous, line, following) in enumerate(zip([""] + lines, lines, lines[1:] + [""]), start=1):
        if line.startswith("|") and not previous.startswith("|"):
            assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", following), f"docs/quality.md:{number}: a table header"


def test_determinism_compares_reruns_pixel_for_pixel_and_counts_what_differs(tmp_path, x0_model_dir, capsys):
    determinism = load("determinism")
    first = {"a": np.zeros((2, 2, 3), dtype=np.int64), "b": np.full((2, 2, 3), 9, dtype=np.int64)}
    second = {"a": first["a"].copy(), "b": first["b"].copy()}
    assert determinism.compare(first, second) == {"largest": 0, "differing": 0, "values": 24, "psnr": None}
    second["b"][0, 0, 0] = 11  # one value two levels off: MSE 4/24
    assert determinism.compare(first, second) == {
        "largest": 2,
        "differing": 1,
        "values": 24,
        "psnr": pytest.approx(10 * math.log10(255**2 * 6)),
    }
    options = ["--model", str(x0_model_dir), "--crops", "2", "--size", "8", "--modes", "fidelity"]
    results = determinism.main([*options, "--backends", "torch", "--output", str(tmp_path / "report")])
    compared = results["fidelity, torch"]
    assert list(compared) == ["1 thread, again", "2 threads", "one batch of 2", "each crop alone, its seed"]
    assert compared["1 thread, again"]["differing"] == 0  # the guarantee README states
    assert all(numbers["values"] == 2 * 32 * 32 * 3 for numbers in compared.values())  # both crops, upscaled x4
    table = (tmp_path / "report" / "determinism.md").read_text(encoding="utf-8")
    assert "| fidelity, torch | 1 thread, again | 0 | 0 of 6144 (0.00%) | identical |" in table
    assert table in capsys.readouterr().out + "\n"
    assert json.loads((tmp_path / "report" / "determinism.json").read_text(encoding="utf-8"))["results"] == results
    with pytest.raises(SystemExit):
        determinism.main([*options[:2], "--crops", "1"])


@pytest.mark.slow  # trains twice, each run in a process of its own
def test_lora_finetune_scores_each_run_on_heldout_images_and_reuses_finished_runs(tmp_path, x0_model_dir, monkeypatch):
    pytest.importorskip("peft")
    from test_data import random_image

    lora_finetune = load("lora_finetune")
    train_dir, held = tmp_path / "train", tmp_path / "held"
    for folder in (train_dir, held / "hr_32", held / "lr_8"):
        folder.mkdir(parents=True)
    for index in range(2):
        random_image(40, 40, index).save(train_dir / f"{index}.png")
    hr = torch.rand(2, 3, 32, 32) * 2 - 1
    lr, _ = degrade(hr, 4)
    for index, (high, low) in enumerate(zip(hr, lr)):
        for folder, image in ((held / "hr_32", high), (held / "lr_8", low)):
            PIL.Image.fromarray(quantize(image[None])[0].permute(1, 2, 0).numpy().astype(np.uint8)).save(
                folder / f"{index}.png"
            )
    options = ["--model", str(x0_model_dir), "--ranks", "0", "2", "--learning_rates", "1e-3", "1e-2", "--steps", "1"]
    options += ["--batch", "2", "--threads", "1", "--train_data_dir", str(train_dir), "--eval_dir", str(held)]
    options += ["--work_dir", str(tmp_path / "runs"), "--output", str(tmp_path / "report"), "--picture", "--detail"]
    lora_finetune.main(options)
    report = json.loads((tmp_path / "report" / "lora_finetune.json").read_text(encoding="utf-8"))
    assert [(row["lora_rank"], row["learning_rate"]) for row in report["rows"]] == [(0, 1e-3), (2, 1e-2)]
    assert report["rows"][1]["trained_parameters"] < report["rows"][0]["trained_parameters"]
    assert all(row["peak_memory_mb"] > 0 and row["adapter_mb"] is not None for row in report["rows"][1:])
    scores = report["scores"]
    assert list(scores) == [
        "bicubic",
        "before fine-tuning",
        "full fine-tune, lr 0.001, seed 0",
        "LoRA rank 2, lr 0.01, seed 0",
    ]
    # The held-out images as saved (8-bit) are what every model is scored on: bicubic's score is theirs.
    saved_hr, saved_lr = (quantize(images) / 127.5 - 1 for images in (hr, lr))
    expected = image_quality(upsample_condition(saved_lr, (32, 32)), saved_hr, saved_lr)
    assert scores["bicubic"]["fidelity"]["psnr"] == pytest.approx(expected["psnr"])
    assert set(scores["bicubic"]) == {"fidelity"}  # one output for both modes
    assert all(set(by_mode) == {"fidelity", "detail"} for name, by_mode in scores.items() if name != "bicubic")
    table = (tmp_path / "report" / "lora_finetune.md").read_text(encoding="utf-8")
    assert "| model | fidelity PSNR | fidelity SSIM | fidelity edge energy / HR's | detail PSNR |" in table
    picture = PIL.Image.open(tmp_path / "report" / "lora_finetune.png")
    crop = 32 * lora_finetune.PICTURE_MAGNIFY  # the whole 32-pixel image: smaller than the picture's crop
    assert picture.size == (5 * crop, 14 + 2 * crop)  # bicubic, before, two runs, HR; a row per held-out image

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(lora_finetune.subprocess, "run", no_training)
    lora_finetune.main(options)
    assert (
        json.loads((tmp_path / "report" / "lora_finetune.json").read_text(encoding="utf-8"))["rows"] == report["rows"]
    )
    # Held-out inputs blurred: the same runs, scored on blurred LR inputs (bicubic's score is the blurred input's).
    lora_finetune.main([*options, "--eval_lr_blur_sigma", "1.5"])
    blurred_scores = json.loads((tmp_path / "report" / "lora_finetune.json").read_text(encoding="utf-8"))["scores"]
    blurred_lr = lora_finetune.blurred(saved_lr, 1.5)
    expected = image_quality(upsample_condition(blurred_lr, (32, 32)), saved_hr, blurred_lr)
    assert blurred_scores["bicubic"]["fidelity"]["psnr"] == pytest.approx(expected["psnr"])
    assert blurred_scores["bicubic"]["fidelity"]["psnr"] < scores["bicubic"]["fidelity"]["psnr"]
    assert "their LR inputs blurred (Gaussian, sigma 1.5 LR pixels)" in (
        tmp_path / "report" / "lora_finetune.md"
    ).read_text(encoding="utf-8")
    # Training on blurred inputs is a run of other settings, which the trainer is told of.
    commands = []
    monkeypatch.setattr(lora_finetune.subprocess, "run", lambda command, **kwargs: commands.append(command))
    with pytest.raises(FileNotFoundError):  # the recorded run: nothing trained it
        lora_finetune.main([*options[:-4], "--work_dir", str(tmp_path / "blur-runs"), "--lr_blur_sigma", "2"])
    assert commands[0][commands[0].index("--lr_blur_sigma") + 1] == "2.0"
    with pytest.raises(SystemExit, match="holds a run of other settings"):
        lora_finetune.main([*options, "--lr_blur_sigma", "2"])
    with pytest.raises(SystemExit, match="one value, or one per --ranks entry"):
        lora_finetune.main([*options, "--seeds", "1", "2", "3"])
    with pytest.raises(SystemExit, match="holds a run of other settings"):
        lora_finetune.main([*options, "--steps", "2"])
    (held / "lr_8" / "1.png").unlink()
    with pytest.raises(SystemExit, match="HR images without their LR"):
        lora_finetune.main(options)


def test_lora_finetune_reuses_runs_recorded_before_lr_blur_sigma_and_names_the_settings_that_differ(
    tmp_path, monkeypatch
):
    lora_finetune = load("lora_finetune")

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(lora_finetune.subprocess, "run", no_training)
    args = argparse.Namespace(steps=40, batch=8, model="sr3-photos-x4", train_data_dir="train", lr_blur_sigma=0.0)
    # A run recorded by the script before --lr_blur_sigma: trained on unblurred inputs, so the same run as blur 0.
    older = dict(lora_rank=16, learning_rate=1e-3, seed=0, steps=40, batch=8, model="sr3-photos-x4")
    run = tmp_path / "rank-16-lr-0.001-seed-0"
    run.mkdir()
    (run / lora_finetune.RUN_RESULTS).write_text(
        json.dumps(dict(settings=dict(older, train_data_dir="train"), lora_rank=16)), encoding="utf-8"
    )
    row = lora_finetune.measured_run(16, 1e-3, 0, str(run), args)
    assert row["settings"] == lora_finetune.run_settings(16, 1e-3, 0, args)
    # Inputs blurred now: another run, refused with the setting that differs named, not the whole record.
    args.lr_blur_sigma = 2.0
    with pytest.raises(SystemExit, match=r"\(lr_blur_sigma 0\.0 there, 2\.0 now\): give another --work_dir"):
        lora_finetune.measured_run(16, 1e-3, 0, str(run), args)


def test_lora_finetune_refuses_a_run_stopped_after_its_checkpoint_before_its_results(tmp_path, monkeypatch):
    lora_finetune = load("lora_finetune")

    def no_training(command, **kwargs):
        raise AssertionError(f"trained over a stopped run's checkpoint: {command}")

    monkeypatch.setattr(lora_finetune.subprocess, "run", no_training)
    args = argparse.Namespace(steps=40, batch=8, model="sr3-photos-x4", train_data_dir="train", lr_blur_sigma=0.0)
    # The trainer refuses to start over a checkpoint with an option the benchmark does not have, and a run resumed
    # at its last step would measure no steps.
    stopped = tmp_path / "rank-4-lr-0.001-seed-0"
    (stopped / "checkpoint-40").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"stopped before .* \(checkpoint-40\): remove the folder to train it again"):
        lora_finetune.measured_run(4, 1e-3, 0, str(stopped), args)


def test_lora_finetune_keeps_a_row_and_a_column_for_each_run_whose_labels_would_read_alike(
    tmp_path, x0_model_dir, monkeypatch
):
    import shutil

    lora_finetune = load("lora_finetune")
    held = tmp_path / "held"
    hr = torch.rand(1, 3, 32, 32) * 2 - 1
    for folder, image in ((held / "hr_32", hr), (held / "lr_8", degrade(hr, 4)[0])):
        folder.mkdir(parents=True)
        PIL.Image.fromarray(quantize(image)[0].permute(1, 2, 0).numpy().astype(np.uint8)).save(folder / "0.png")

    def measured_run(rank, learning_rate, seed, output, args):  # the tiny model stands for each run's result
        shutil.copytree(x0_model_dir, output)
        sizes = dict(trained_parameters=1, seconds_per_step=1.0, peak_memory_mb=1, checkpoint_mb=1, saved_unet_mb=1)
        return dict(lora_rank=rank, learning_rate=learning_rate, seed=seed, adapter_mb=None, **sizes)

    monkeypatch.setattr(lora_finetune, "measured_run", measured_run)
    # An arm listed twice (to see the noise), and two learning rates that one significant digit writes alike.
    options = ["--model", str(x0_model_dir), "--ranks", "0", "0", "0", "--learning_rates", "1e-3", "1e-3", "1.2e-3"]
    options += ["--eval_dir", str(held), "--work_dir", str(tmp_path / "runs"), "--output", str(tmp_path / "report")]
    lora_finetune.main([*options, "--picture"])
    report = json.loads((tmp_path / "report" / "lora_finetune.json").read_text(encoding="utf-8"))
    assert list(report["scores"])[2:] == [
        "full fine-tune, lr 0.001, seed 0",
        "full fine-tune, lr 0.001, seed 0, again 1",
        "full fine-tune, lr 0.0012, seed 0",
    ]
    table = (tmp_path / "report" / "lora_finetune.md").read_text(encoding="utf-8")
    assert table.count("| full fine-tune, lr 0.001, seed 0, again 1 |") == 2  # its speed row and its scores row
    picture = PIL.Image.open(tmp_path / "report" / "lora_finetune.png")
    assert picture.size[0] == 6 * 32 * lora_finetune.PICTURE_MAGNIFY  # bicubic, before, three runs, HR


def test_space_examples_times_the_pages_own_request_on_each_example_photo(x0_model_dir, capsys):
    space_examples = load("space_examples")
    space = space_examples.load_space()
    pipeline = space.load_pipeline(str(x0_model_dir), "cpu")
    pipeline.register_to_config(detail_steps=2)  # the page's default steps: few, to keep the test fast
    photo = next(path for path in space.example_images() if path.endswith("chelsea_96x64.png"))
    (row,) = space_examples.time_examples(space, pipeline, [photo])
    assert row["photo"] == "chelsea_96x64.png" and row["seconds"] > 0 and len(row["load"]) == 2
    assert "96x64 → 384x256 · ddim, 2 steps" in row["summary"]  # the page's request, at the page's defaults
    assert "chelsea_96x64.png: " in capsys.readouterr().out
