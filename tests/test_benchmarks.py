"""The benchmark scripts run end to end (tiny settings) and report every section they promise."""

import argparse
import importlib.util
import json
import lzma
import math
import os
import pathlib
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import REPO, needs_bfloat16_kernels

from diffusers_sr3.image_processing import degrade
from diffusers_sr3.metrics import frechet_distance
from diffusers_sr3.pipelines.pipeline_sr3 import FIDELITY_STEPS


def load(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_results_are_written_whole(tmp_path):
    """Every benchmark writes `<name>.json` and `<name>.md` through one helper; a write that fails keeps the previous
    results and leaves no partial file."""
    write_report = load("report_files").write_report
    folder = tmp_path / "new" / "folder"
    assert write_report(str(folder), "study", {"rows": [1, 2]}, "| a |\n") == "| a |\n"
    assert json.loads((folder / "study.json").read_text(encoding="utf-8")) == {"rows": [1, 2]}
    assert (folder / "study.md").read_text(encoding="utf-8") == "| a |\n"
    with pytest.raises(TypeError):
        write_report(str(folder), "study", {"rows": object()}, "| b |\n")  # not JSON: fails half-way through
    assert json.loads((folder / "study.json").read_text(encoding="utf-8")) == {"rows": [1, 2]}
    assert sorted(path.name for path in folder.iterdir()) == ["study.json", "study.md"]


@pytest.mark.slow
def test_speed_benchmark_reports_every_section(tmp_path):
    run = load("run")
    report = run.main(
        [
            "--preset", "tiny", "--repeats", "1", "--warmup", "0", "--schedules", "ddim:3", "ddpm:20",
            "--variants", "fp32 NCHW (plain)", "fp32 channels_last", "bf16 channels_last",
            "--max-measured-steps", "3", "--train-batch", "2", "--train-steps", "1", "--resolutions", "32", "64",
            "--train-variants", "fp32 NCHW (plain)", "bf16 autocast + channels_last + fused Adam + checkpointing",
            "--peak-channels", "32",
            "--batches", "1", "2", "--output", str(tmp_path),
        ]
    )  # fmt: skip
    assert report["parameters_m"] > 0 and report["gflop_per_eval"] > 0
    assert set(report["machine"]["conv_peak_gflops"]) == {"float32", "bfloat16"}
    variants = [row["variant"] for row in report["inference"]]
    assert variants == ["fp32 NCHW (plain)", "fp32 channels_last", "bf16 channels_last"]
    assert report["inference"][0]["speedup_vs_plain_fp32"] == 1.0
    assert all(row["relative_error_vs_fp32"] < 0.05 for row in report["inference"])
    assert [row["measured"] for row in report["pipeline"]] == [True, False]
    assert len(report["training"]) == 2 and report["training"][0]["speedup_vs_plain_fp32"] == 1.0
    assert all(row["peak_rss_gib"] > row["runtime_gib"] > 0 for row in report["training"])
    plain, checkpointed = report["training"]
    assert plain["parameters_gib"] == checkpointed["parameters_gib"] > 0
    assert 0 < checkpointed["activations_gib"] < plain["activations_gib"]  # checkpointing keeps block inputs only
    assert {(row["resolution"], row["batch"]) for row in report["scaling"]} == {(32, 1), (32, 2), (64, 1), (64, 2)}
    written = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert written["fastest_variant"] == report["fastest_variant"]
    table = (tmp_path / "run.md").read_text(encoding="utf-8")
    assert "| inference variant |" in table and "Training step" in table and "Scaling" in table


@pytest.mark.slow
def test_model_report_evaluates_and_writes_the_card(tmp_path, tiny_unet):
    import yaml
    from conftest import SAMPLES

    from diffusers_sr3 import SR3Pipeline, make_scheduler

    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample_range=10.0)
    SR3Pipeline(tiny_unet, scheduler, residual=True, residual_scale=5.0).save_pretrained(tmp_path / "model")
    report = load("model_report").main(
        [
            "--model", str(tmp_path / "model"), "--faces", str(SAMPLES),
            "--unseen", str(SAMPLES / "celebahq_16_128" / "hr_128"), "--unseen-crops", "3",
            "--face-size", "64", "--crop-size", "32", "--crops", "4", "--steps", "2", "--self-ensemble",
            "--output", str(tmp_path / "r"), "--write-card", "--training-command", "accelerate launch train.py --x 1",
        ]
    )  # fmt: skip
    faces = report["sets"]["original's sample faces"]
    assert faces["images"] == 5 and faces["size"] == 64  # 64px output from a 32px-trained model: tiled
    assert report["sets"]["never-seen photos"]["images"] == 3
    report_table = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    for evaluated in report["sets"].values():
        for method in ("SR3 fidelity", "SR3 fidelity (self-ensemble)", "SR3 detail", "bicubic"):
            values = evaluated["results"][method]
            assert {"psnr", "ssim", "consistency", "colour_error", "edge_ratio", "flat_grain", "fid"} <= set(values)
            assert f"| {values['flat_grain']:.2f} ({evaluated['hr_flat_grain']:.2f}) |" in report_table
        assert "two_seeds_differ_255" in evaluated["results"]["SR3 detail"]
        assert sum(values["crops"] for values in evaluated["edges_by_content"].values()) == evaluated["images"]
    # Magnified crops: LR | bicubic | fidelity (single, self-ensemble) | detail | HR, 3 busiest crops per set and
    # the flattest photo crop.
    picture = PIL.Image.open(tmp_path / "r" / "evaluation.png")
    assert picture.width == 6 * 3 * 64 and (tmp_path / "model" / "evaluation.png").exists()
    card = (tmp_path / "model" / "README.md").read_text(encoding="utf-8")
    assert "| Grain on flat crops (/255) |" in card
    metadata = yaml.safe_load(card.split("---")[1])
    assert {m["type"] for m in metadata["model-index"][0]["results"][0]["metrics"]} >= {"psnr", "ssim", "fid"}
    assert "held-out photos" in card and "original's sample faces" in card and "train.py --x 1" in card
    assert "Two ways to sample" in card and "SR3 detail" in card
    assert 'mode="detail", num_inference_steps=2, strength=1)' in card  # the detail settings this report ran
    # The fidelity mode is the model's reported result, under its own name; the picture says what it shows.
    fidelity = report["sets"]["held-out photos"]["results"]["SR3 fidelity"]
    psnr = next(m for m in metadata["model-index"][0]["results"][0]["metrics"] if m["type"] == "psnr")
    assert psnr["value"] == pytest.approx(fidelity["psnr"], abs=1e-5)
    assert "| SR3 fidelity |" in card and "| SR3 fidelity (self-ensemble) |" in card
    assert "*LR | bicubic | SR3 fidelity | SR3 fidelity (self-ensemble) | SR3 detail | HR, magnified x3" in card


def test_model_report_splits_edge_energy_by_how_much_detail_bicubic_keeps():
    model_report = load("model_report")
    generator = torch.Generator().manual_seed(0)
    texture = torch.rand(3, 3, 32, 32, generator=generator) * 2 - 1  # pixel noise: bicubic keeps little of it
    ramps = torch.linspace(-1, 1, 32).expand(2, 3, 32, 32).clone()  # smooth: bicubic keeps nearly all
    hr = torch.cat([texture, ramps])
    bicubic = degrade(hr, 4)[1].clamp(-1, 1)
    half = (hr + bicubic) / 2
    table = model_report.edges_by_content(hr, {"bicubic": bicubic, "HR itself": hr, "halfway": half})
    assert set(table) == {"texture", "edges"}
    assert table["texture"]["crops"] == 3 and table["edges"]["crops"] == 2
    assert table["texture"]["bicubic"] < 0.45 <= 0.65 <= table["edges"]["bicubic"]
    for kind in table.values():
        assert kind["HR itself"] == pytest.approx(1.0)
        assert kind["bicubic"] < kind["halfway"] < 1.0
    crops = torch.cat([texture[:1], ramps[:1]])
    alone = model_report.edges_by_content(crops, {"bicubic": degrade(crops, 4)[1].clamp(-1, 1), "HR itself": crops})
    assert alone["texture"]["crops"] == 1 and alone["edges"]["crops"] == 1


def test_pictured_crops_are_chosen_by_edge_energy_not_by_the_spread_of_their_values():
    """A smooth ramp has a wider spread of values than fine grain and nothing to restore: the pictures show
    the crop with fine texture as the most detailed, and a uniform crop (not the ramp) as the flattest."""
    model_report = load("model_report")
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-0.3, 0.3, 32).expand(1, 3, 32, 32)
    texture = (torch.rand(1, 3, 32, 32, generator=generator) - 0.5) * 0.4  # fine grain, a narrower spread
    uniform = torch.full((1, 3, 32, 32), 0.3)
    crops = torch.cat([ramp, texture, uniform])
    assert crops.flatten(1).std(dim=1).argmax() == 0  # the ramp spreads widest
    assert model_report.busiest(crops, 2) == [1, 0]
    assert model_report.flattest(crops) == 2


def test_model_report_card_quotes_the_detail_settings_it_measured():
    modes_section = load("model_report").modes_section
    refined = modes_section(10, 1.0, 0.6)
    assert 'mode="detail", num_inference_steps=10, eta=1, strength=0.6)' in refined
    assert "last 60% of the schedule" in refined
    from_noise = modes_section(25, None, 1.0)
    assert "num_inference_steps=25, strength=1)" in from_noise and "refines from pure noise" in from_noise
    assert "last 100%" not in from_noise
    assert "own detail settings" not in refined
    own = modes_section(10, 1.0, 0.6, 2.0, own_settings=True)
    assert '`pipe(image, mode="detail")`, which runs this pipeline\'s own detail settings' in own
    assert "num_inference_steps=10, eta=1, strength=0.6, guidance_scale=2)" in own
    assert "window_size" not in own
    windowed = modes_section(10, 1.0, 0.6, 2.0, own_settings=True, window_size=64)
    assert "guidance_scale=2, window_size=64)" in windowed and "under 256 pixels on their shorter side" in windowed


def test_model_report_runs_fidelity_mode_at_its_own_steps_not_detail_modes(tiny_unet):
    from diffusers_sr3 import SR3Pipeline, make_scheduler

    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample_range=10.0)
    pipeline = SR3Pipeline(tiny_unet, scheduler, residual=True, residual_scale=5.0)
    pipeline.set_progress_bar_config(disable=True)
    model_report = load("model_report")
    low = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    args = argparse.Namespace(
        steps=2, fidelity_steps=FIDELITY_STEPS, seed=0, batch_size=2, backend="torch", eta=None, strength=None
    )
    reported = model_report.super_resolve(pipeline, low, "fidelity", args)
    default = pipeline((low + 1) / 2, mode="fidelity", output_type="pt").images * 2 - 1
    two_steps = pipeline((low + 1) / 2, mode="fidelity", num_inference_steps=2, output_type="pt").images * 2 - 1
    torch.testing.assert_close(reported, default)
    assert not torch.allclose(reported, two_steps, atol=1e-4)


def test_model_report_scores_crops_of_photos_super_resolved_whole(tmp_path, tiny_unet):
    from conftest import SAMPLES

    from diffusers_sr3 import SR3Pipeline, make_scheduler
    from diffusers_sr3.image_processing import images_to_tensor, resize_bicubic, upsample_condition
    from diffusers_sr3.metrics import quantize

    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample_range=10.0)
    pipeline = SR3Pipeline(tiny_unet, scheduler, residual=True, residual_scale=5.0)
    pipeline.set_progress_bar_config(disable=True)
    faces = sorted(SAMPLES.glob("*/hr_128/*.png"))[:2]
    paths = []
    for index, (face, size) in enumerate(zip(faces, [(126, 90), (70, 66)])):  # trimmed to multiples of 4
        paths.append(tmp_path / f"photo{index}.png")
        PIL.Image.open(face).convert("RGB").resize(size).save(paths[-1])
    model_report = load("model_report")
    args = argparse.Namespace(
        crop_size=32, modes=["fidelity", "detail"], self_ensemble=False, steps=2, fidelity_steps=FIDELITY_STEPS,
        seed=0, batch_size=2, backend="torch", eta=None, strength=None, guidance_scale=None, window_size=None,
        parallel_guidance_weight=None, detail_seeds=1,
    )  # fmt: skip
    evaluated = model_report.evaluate_whole_photos(pipeline, paths, 6, 0, args, fid=None)
    lr, outputs, hr = evaluated["tensors"]
    assert evaluated["images"] == 6 and hr.shape[1:] == (3, 32, 32) and lr.shape[1:] == (3, 8, 8)
    assert set(outputs) == {"bicubic", "SR3 fidelity", "SR3 detail"}
    assert "two_seeds_differ_255" in evaluated["results"]["SR3 detail"]
    # Each crop is the same window of the photo, of its 8-bit input and of the photo's bicubic upsample, on the
    # input's grid.
    photos = [images_to_tensor(PIL.Image.open(path))[..., : size[1] // 4 * 4, : size[0] // 4 * 4]
              for path, size in zip(paths, [(126, 90), (70, 66)])]  # fmt: skip

    def window(crop):
        for photo in photos:
            for y in range(0, photo.shape[-2] - 31, 4):
                for x in range(0, photo.shape[-1] - 31, 4):
                    if torch.equal(photo[..., y : y + 32, x : x + 32], crop):
                        return photo, y, x
        raise AssertionError("a crop that is no window of the photos on the input's grid")

    consistencies = []
    for index in range(6):
        photo, y, x = window(hr[index : index + 1])
        whole_lr = model_report.low_resolution_input(photo, 4)
        torch.testing.assert_close(lr[index : index + 1], whole_lr[..., y // 4 : y // 4 + 8, x // 4 : x // 4 + 8])
        whole_bicubic = upsample_condition(whole_lr, tuple(photo.shape[-2:])).clamp(-1, 1)
        torch.testing.assert_close(outputs["bicubic"][index : index + 1], whole_bicubic[..., y : y + 32, x : x + 32])
        # Consistency is measured on the photo's downsampled output, in the crop's window.
        downsampled = resize_bicubic(quantize(whole_bicubic).float() / 127.5 - 1, tuple(whole_lr.shape[-2:]))
        window_error = (downsampled - whole_lr)[..., y // 4 : y // 4 + 8, x // 4 : x // 4 + 8]
        consistencies.append(float((window_error.double() / 2).pow(2).mean()))
    assert evaluated["results"]["bicubic"]["consistency"] == pytest.approx(np.mean(consistencies), rel=1e-6)


def test_model_report_averages_detail_mode_over_seeds(tmp_path, tiny_unet, monkeypatch):
    """--detail-seeds N: detail mode's metrics and FID are the means of N draws, each what a one-seed report of that
    seed measures; the picture and the other methods are the first seed's."""
    from conftest import SAMPLES

    from diffusers_sr3 import SR3Pipeline, make_scheduler

    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample_range=10.0)
    SR3Pipeline(tiny_unet, scheduler, residual=True, residual_scale=5.0).save_pretrained(tmp_path / "model")
    model_report = load("model_report")

    # A stand-in for the Inception FID (the distance of mean colours; the averaging is under test, not FID), as
    # `fids` drives it: real statistics kept across resets.
    class MeanColourDistance:
        reset_real_features = True

        def __init__(self):
            self.real, self.fake = [], []

        def reset(self):
            self.fake = []
            if self.reset_real_features:
                self.real = []

        largest_batch = 0

        def update(self, images, real):
            MeanColourDistance.largest_batch = max(MeanColourDistance.largest_batch, images.shape[0])
            (self.real if real else self.fake).append(images.double().mean(dim=(0, 2, 3)))

        def compute(self):
            return (torch.stack(self.real).mean(0) - torch.stack(self.fake).mean(0)).norm()

    monkeypatch.setattr(model_report, "frechet_inception_distance", MeanColourDistance)
    command = ["--model", str(tmp_path / "model"), "--faces", str(SAMPLES), "--face-size", "32", "--crop-size", "32"]
    command += ["--crops", "2", "--steps", "2", "--eta", "1", "--output", str(tmp_path / "r")]
    monkeypatch.setattr(model_report, "FID_BATCH", 1)  # the Inception network sees one image at a time
    report = model_report.main(command + ["--detail-seeds", "3", "--save-outputs"])
    assert MeanColourDistance.largest_batch == 1
    averaged = report["sets"]["original's sample faces"]["results"]
    # The saved outputs hold every draw the means are over, for FID elsewhere.
    _, saved = model_report.load_outputs(str(tmp_path / "r" / "outputs_original-s-sample-faces.npz"))
    assert list(saved) == ["bicubic", "SR3 fidelity", "SR3 detail", "SR3 detail, draw 2", "SR3 detail, draw 3", "HR"]
    assert not np.array_equal(saved["SR3 detail"], saved["SR3 detail, draw 2"])
    assert not np.array_equal(saved["SR3 detail, draw 2"], saved["SR3 detail, draw 3"])
    assert report["detail_seeds"] == 3 and averaged["SR3 detail"]["seeds"] == 3
    assert "means over 3 seeds" in (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    per_seed = averaged["SR3 detail"]["fid_per_seed"]
    assert len(per_seed) == 3 and len(set(per_seed)) == 3  # three different draws
    assert averaged["SR3 detail"]["fid"] == pytest.approx(np.mean(per_seed))

    # Each draw is what a one-seed evaluation of the same faces with that seed measures.
    pipeline = SR3Pipeline.from_pretrained(tmp_path / "model")
    pipeline.set_progress_bar_config(disable=True)
    faces = model_report.face_images(str(SAMPLES), 32)

    def evaluate(seed):
        args = argparse.Namespace(
            modes=["fidelity", "detail"], self_ensemble=False, steps=2, fidelity_steps=FIDELITY_STEPS, seed=seed,
            batch_size=16, backend="auto", eta=1.0, strength=1.0, guidance_scale=None, window_size=None, detail_seeds=1,
            parallel_guidance_weight=None,
        )  # fmt: skip
        return model_report.evaluate_set(pipeline, faces, args, fid=None)["results"]

    singles = [evaluate(seed) for seed in range(3)]
    for metric in ("psnr", "ssim", "consistency", "edge_ratio"):
        expected = np.mean([single["SR3 detail"][metric] for single in singles])
        assert averaged["SR3 detail"][metric] == pytest.approx(expected, rel=1e-6), metric
    assert averaged["SR3 detail"]["colour_error"] == pytest.approx(
        np.mean([single["SR3 detail"]["colour_error"] for single in singles], axis=0), rel=1e-6
    )
    # The other methods, and the two-seed difference (seeds 0 and 1), are those of a one-seed report.
    assert averaged["SR3 fidelity"]["psnr"] == pytest.approx(singles[0]["SR3 fidelity"]["psnr"], rel=1e-6)
    assert "seeds" not in singles[0]["SR3 detail"]
    differ = singles[0]["SR3 detail"]["two_seeds_differ_255"]
    assert averaged["SR3 detail"]["two_seeds_differ_255"] == pytest.approx(differ, rel=1e-6)
    with pytest.raises(SystemExit):
        model_report.main(command + ["--detail-seeds", "0"])


def test_model_report_averages_whole_photo_detail_over_seeds(tmp_path, tiny_unet):
    """The same with the photos super-resolved whole: each draw's consistency on its own whole output."""
    from conftest import SAMPLES

    from diffusers_sr3 import SR3Pipeline, make_scheduler

    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample_range=10.0)
    pipeline = SR3Pipeline(tiny_unet, scheduler, residual=True, residual_scale=5.0)
    pipeline.set_progress_bar_config(disable=True)
    paths = sorted(SAMPLES.glob("*/hr_128/*.png"))[:1]
    model_report = load("model_report")

    def evaluate(seed, detail_seeds):
        args = argparse.Namespace(
            crop_size=32, modes=["detail"], self_ensemble=False, steps=2, fidelity_steps=FIDELITY_STEPS, seed=seed,
            batch_size=2, backend="torch", eta=1.0, strength=None, guidance_scale=None, window_size=None,
            parallel_guidance_weight=None, detail_seeds=detail_seeds,
        )  # fmt: skip
        return model_report.evaluate_whole_photos(pipeline, paths, 4, 0, args, fid=None)["results"]["SR3 detail"]

    both = evaluate(0, 2)
    singles = [evaluate(seed, 1) for seed in (0, 1)]
    assert both["seeds"] == 2
    for metric in ("psnr", "consistency", "edge_ratio"):
        expected = np.mean([single[metric] for single in singles])
        assert both[metric] == pytest.approx(expected, rel=1e-6), metric
    assert singles[0]["consistency"] != singles[1]["consistency"]


def test_sampler_study_compares_against_the_reference():
    samplers = load("samplers")
    rows = [
        dict(entry="ddpm:2000", evaluations=2000, seconds_per_image=100.0, psnr=30.0, ssim=0.80),
        dict(entry="ddim:10", evaluations=10, seconds_per_image=0.5, psnr=29.5, ssim=0.80),  # 0.5 dB worse
        dict(entry="ddim:25", evaluations=25, seconds_per_image=1.25, psnr=29.8, ssim=0.795),
        dict(entry="unipc:25", evaluations=25, seconds_per_image=1.2, psnr=29.9, ssim=0.795),  # faster clock, too
        dict(entry="unipc:50", evaluations=50, seconds_per_image=2.5, psnr=30.1, ssim=0.801),
    ]
    # Fewest evaluations first, then the higher PSNR: the wall clock of a shared machine does not decide.
    assert samplers.compare(rows) == "unipc:25"
    rows[3]["psnr"] = 29.75
    assert samplers.compare(rows) == "ddim:25"
    assert [row["equal_quality"] for row in rows] == [True, False, True, True, True]
    assert rows[2]["speedup"] == pytest.approx(80.0)
    assert samplers.compare(rows[:2]) is None
    for bad in ("ddim", "nope:10", "ddim:0", "ddim:x", "ddim:10:eta", "ddim:10:beta=1", "fidelity:4:eta=1"):
        with pytest.raises(ValueError, match="scheduler:steps"):
            samplers.parse_entry(bad)
    assert samplers.parse_entry("ddim:10:eta=1:temperature=0.5") == ("ddim", 10, {"eta": 1.0, "temperature": 0.5})
    assert samplers.parse_entry("fidelity:4") == ("fidelity", 4, {})
    assert samplers.parse_entry("ddim:10:strength=0.3") == ("ddim", 10, {"strength": 0.3})
    assert samplers.parse_entry("ddim:10:window_size=64") == ("ddim", 10, {"window_size": 64})
    entry = "ddim:10:guidance_scale=4:parallel_guidance_weight=0.7"
    assert samplers.parse_entry(entry) == ("ddim", 10, {"guidance_scale": 4.0, "parallel_guidance_weight": 0.7})


@pytest.mark.slow
def test_sampler_study_runs_every_entry(tmp_path, tiny_pipeline):
    tiny_pipeline.save_pretrained(tmp_path / "model")
    report = load("samplers").main(
        [
            "--model", str(tmp_path / "model"), "--entries", "ddpm:6", "ddim:2", "dpmsolver:3", "--crops", "3",
            "--crop-size", "32", "--batch-size", "2", "--fid", "--output", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    assert [row["entry"] for row in report["rows"]] == ["ddpm:6", "ddim:2", "dpmsolver:3"]
    assert [row["evaluations"] for row in report["rows"]] == [6, 2, 3]
    for row in report["rows"] + [report["bicubic"]]:
        assert {"psnr", "ssim", "consistency", "colour_error", "edge_ratio", "fid"} <= set(row)
    reference = report["rows"][0]["seconds_per_image"]
    assert all(row["speedup"] == pytest.approx(reference / row["seconds_per_image"]) for row in report["rows"])
    # Different samplers really give different images from the same seed.
    assert len({round(row["psnr"], 6) for row in report["rows"]}) == 3
    written = json.loads((tmp_path / "out" / "samplers.json").read_text(encoding="utf-8"))
    assert written["recommended"] == report["recommended"]
    table = (tmp_path / "out" / "samplers.md").read_text(encoding="utf-8")
    assert "| ddim | 2 |" in table and "| bicubic | - |" in table and "Recommended:" in table


def test_sampler_study_on_a_folder_of_photos_reports_texture_crops(tmp_path, tiny_pipeline):
    """--photos: crops of photos never trained on, with the edge energy of the texture crops on its own."""
    tiny_pipeline.save_pretrained(tmp_path / "model")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)  # detail finer than any LR pixel: texture
    PIL.Image.fromarray(noise).save(photos / "grain.png")
    ramp = np.broadcast_to(np.linspace(0, 255, 96, dtype=np.uint8)[None, :, None], (96, 96, 3))
    PIL.Image.fromarray(np.ascontiguousarray(ramp)).save(photos / "ramp.bmp")
    report = load("samplers").main(
        ["--model", str(tmp_path / "model"), "--photos", str(photos), "--entries", "ddim:2", "--crops", "6"]
        + ["--crop-size", "32", "--output", str(tmp_path / "out")]
    )
    assert report["photos"] == str(photos) and report["images"] == 6
    assert 0 < report["texture_crops"] < 6  # the grain's crops, not the ramp's
    assert all(row["texture_edge_ratio"] > 0 for row in report["rows"])
    # Each texture crop's bicubic keeps under 45% of its HR's edge energy, so their sum does too.
    assert 0 < report["bicubic"]["texture_edge_ratio"] < 0.45
    table = (tmp_path / "out" / "samplers.md").read_text(encoding="utf-8")
    assert f"texture edges / HR ({report['texture_crops']} crops)" in table
    # Grain on the flattest crop (the ramp's): bicubic draws none, the HR's own is in the header.
    assert report["bicubic"]["flat_grain"] < 0.5 and all(row["flat_grain"] >= 0 for row in report["rows"])
    assert f"grain on flat crops (/255; HR {report['hr_flat_grain']:.2f})" in table
    # bicubic | the entry | HR, magnified x3: the texture crops (at most 4) and the flattest crop.
    rows = min(report["texture_crops"], 4) + 1
    assert PIL.Image.open(tmp_path / "out" / "samplers.png").size == (3 * 96, rows * 96)


def test_sampler_study_on_whole_photos_cuts_the_report_crops_from_whole_outputs(tmp_path, tiny_pipeline, monkeypatch):
    """--whole-photos: each photo super-resolved whole, as `sr3 upscale` does; the crops model_report.py cuts."""
    from diffusers_sr3.image_io import find_images

    tiny_pipeline.save_pretrained(tmp_path / "model")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (72, 96)), ("b.png", (64, 68))):
        coarse = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
        PIL.Image.fromarray(coarse).resize(size[::-1], PIL.Image.BICUBIC).save(photos / name)
    samplers = load("samplers")
    inputs = []
    real_sample = samplers.sample

    def recording(pipeline, saved, lr, *args, **kwargs):
        inputs.append(tuple(lr.shape))
        return real_sample(pipeline, saved, lr, *args, **kwargs)

    monkeypatch.setattr(samplers, "sample", recording)
    command = ["--model", str(tmp_path / "model"), "--photos", str(photos), "--entries", "ddim:2", "--crops", "5"]
    command += ["--crop-size", "32", "--output", str(tmp_path / "out")]
    report = samplers.main(command + ["--whole-photos"])
    assert inputs == [(1, 3, 18, 24), (1, 3, 16, 17)]  # each photo's whole input, once per entry
    assert report["whole_photos"] and report["images"] == 5 and report["rows"][0]["evaluations"] == 2
    assert "super-resolved whole" in (tmp_path / "out" / "samplers.md").read_text(encoding="utf-8")
    # The bicubic row scores model_report.py --whole-photos's crops: the same places, consistency on the whole photo.
    model_report = load("model_report")
    args = argparse.Namespace(crop_size=32, modes=[], self_ensemble=False, seed=0, detail_seeds=1)
    pipeline = samplers.SR3Pipeline.from_pretrained(tmp_path / "model")
    expected = model_report.evaluate_whole_photos(pipeline, find_images([str(photos)]), 5, 2, args, fid=None)
    for metric in ("psnr", "ssim", "consistency", "edge_ratio"):
        assert report["bicubic"][metric] == pytest.approx(expected["results"]["bicubic"][metric], rel=1e-6), metric
    # On crops alone the entry sees 8x8 inputs instead, and scores differently.
    inputs.clear()
    alone = samplers.main(command)
    assert inputs == [(5, 3, 8, 8)] and alone["rows"][0]["psnr"] != report["rows"][0]["psnr"]
    # --tile-size runs the network on tiles of that size, as `sr3 upscale --tile-size` does.
    sizes = []
    monkeypatch.setattr(samplers, "sample", real_sample)
    network = samplers.SR3UNet2DModel.forward
    monkeypatch.setattr(
        samplers.SR3UNet2DModel,
        "forward",
        lambda self, sample, *a, **k: sizes.append(sample.shape[-1]) or network(self, sample, *a, **k),
    )
    tiled = samplers.main(command + ["--whole-photos", "--tile-size", "32"])
    assert set(sizes) == {32} and tiled["tile_size"] == 32
    assert "32px tiles" in (tmp_path / "out" / "samplers.md").read_text(encoding="utf-8")
    assert tiled["rows"][0]["psnr"] != report["rows"][0]["psnr"]
    with pytest.raises(SystemExit):
        samplers.parse_args(command + ["--tile-size", "32"])


def test_sampler_study_on_the_training_photos_draws_from_the_training_side(tmp_path, tiny_pipeline, monkeypatch):
    """--training-photos: the same study on crops of the split's training side at --max-side, whole or alone."""
    tiny_pipeline.save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    paths = []
    for index in range(4):
        paths.append(tmp_path / f"photo{index}.png")
        PIL.Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(paths[-1])
    samplers = load("samplers")
    monkeypatch.setattr(samplers, "packaged_photo_paths", lambda: paths)
    training, held = samplers.photo_split(paths, heldout=0.25)
    cropped, whole = [], []
    real_crops, real_whole = samplers.photo_crops, samplers.model_report.load_whole_photos
    monkeypatch.setattr(
        samplers, "photo_crops", lambda photos, *a, **k: cropped.append(photos) or real_crops(photos, *a, **k)
    )
    monkeypatch.setattr(
        samplers.model_report,
        "load_whole_photos",
        lambda photos, factor, max_side: whole.append((photos, max_side)) or real_whole(photos, factor, max_side),
    )
    command = ["--model", str(tmp_path / "model"), "--training-photos", "--entries", "ddim:2", "--crops", "3"]
    command += ["--crop-size", "32", "--max-side", "64", "--output", str(tmp_path / "out")]
    report = samplers.main(command)
    assert cropped == [training] and report["photos"] == "training photos" and report["images"] == 3
    assert "of training photos" in (tmp_path / "out" / "samplers.md").read_text(encoding="utf-8")
    samplers.main(command + ["--whole-photos"])
    assert whole == [(training, 64)] and not set(held) & set(training)
    with pytest.raises(SystemExit):
        samplers.parse_args(command + ["--photos", str(tmp_path)])


@pytest.fixture
def x0_model_dir(tmp_path, tiny_unet):
    """A tiny residual pipeline that predicts the clean image (fidelity mode needs one), saved to a folder."""
    from diffusers_sr3 import SR3Pipeline, make_scheduler

    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample_range=4.0)
    SR3Pipeline(tiny_unet, scheduler, upscale_factor=4, residual=True, residual_scale=2.0).save_pretrained(
        tmp_path / "x0-model"
    )
    return tmp_path / "x0-model"


@pytest.mark.slow
def test_sampler_study_takes_fidelity_mode_and_detail_knobs(tmp_path, x0_model_dir):
    report = load("samplers").main(
        [
            "--model", str(x0_model_dir), "--entries", "ddim:3", "ddim:3:eta=1", "ddim:3:temperature=0.5",
            "fidelity:2", "ddim:10:eta=1:strength=0.3", "--crops", "2", "--crop-size", "32", "--backend", "bf16",
            "--output", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    # Strength 0.3 of 10 steps: the fidelity answer (FIDELITY_STEPS evaluations), then the last 3 steps.
    assert [row["evaluations"] for row in report["rows"]] == [3, 3, 3, 2, FIDELITY_STEPS + 3]
    assert len({round(row["psnr"], 6) for row in report["rows"]}) == 5  # each knob changes the images
    assert "backend bf16" in report["machine"]
    table = (tmp_path / "out" / "samplers.md").read_text(encoding="utf-8")
    assert "| ddim eta=1 | 3 |" in table and "| fidelity | 2 |" in table


def test_sampler_study_entries_ignore_the_models_saved_detail_settings(tmp_path, x0_model_dir):
    """An entry is what it names: a model saved with its own detail settings samples `ddim:3` from noise at eta 0."""
    from diffusers_sr3 import SR3Pipeline

    studied = SR3Pipeline.from_pretrained(x0_model_dir, detail_steps=5, detail_strength=0.5, detail_eta=1.0)
    studied.save_pretrained(tmp_path / "studied")
    reports = [
        load("samplers").main(
            ["--model", str(model), "--entries", "ddim:3", "ddim:3:eta=1", "--crops", "2", "--crop-size", "32"]
            + ["--output", str(tmp_path / f"out{index}")]
        )
        for index, model in enumerate((x0_model_dir, tmp_path / "studied"))
    ]
    assert [row["evaluations"] for row in reports[1]["rows"]] == [3, 3]  # from noise: no fidelity answer first
    assert [row["psnr"] for row in reports[1]["rows"]] == [row["psnr"] for row in reports[0]["rows"]]
    assert reports[1]["rows"][0]["psnr"] != reports[1]["rows"][1]["psnr"]  # eta 0, not the saved 1


def test_sampler_study_and_packaging_take_a_guide(tmp_path, x0_model_dir):
    """--guidance-unet attaches a guide for `guidance_scale` entries; package_model ships one in bfloat16."""
    from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel

    guide = SR3UNet2DModel.from_pretrained(x0_model_dir / "unet")
    for parameter in guide.parameters():
        parameter.data.mul_(0.9)
    guide.save_pretrained(tmp_path / "guide")
    report = load("samplers").main(
        [
            "--model", str(x0_model_dir), "--guidance-unet", str(tmp_path / "guide"), "--entries", "ddim:3",
            "ddim:3:guidance_scale=2", "ddim:10:strength=0.3:guidance_scale=2",
            "ddim:3:guidance_scale=2:parallel_guidance_weight=0", "--crops", "2", "--crop-size", "32",
            "--output", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    # The guide runs beside the UNet at each refinement step, not in the fidelity answer a strength below 1 starts from.
    assert [row["evaluations"] for row in report["rows"]] == [3, 6, FIDELITY_STEPS + 2 * 3, 6]
    assert len({round(row["psnr"], 6) for row in report["rows"]}) == 4
    unguided = load("samplers").main(
        ["--model", str(x0_model_dir), "--entries", "ddim:3", "--crops", "2", "--crop-size", "32"]
        + ["--output", str(tmp_path / "plain")]
    )
    assert unguided["rows"][0]["psnr"] == report["rows"][0]["psnr"]  # entries without a scale run unguided
    with pytest.raises(ValueError, match="scheduler:steps"):
        load("samplers").parse_entry("fidelity:4:guidance_scale=2")

    package = load("package_model")
    package.main(
        ["--trained", str(x0_model_dir), "--output", str(tmp_path / "packaged")]
        + ["--guidance-unet", str(tmp_path / "guide"), "--guidance-scale", "2.5"]
    )
    packaged = SR3Pipeline.from_pretrained(tmp_path / "packaged")
    assert packaged.config.guidance_scale == 2.5 and packaged.guided()
    assert (packaged.config.detail_strength, packaged.config.detail_window_size) == (0.6, 64)
    weights = (tmp_path / "packaged" / "guidance_unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert weights < 0.6 * (tmp_path / "guide" / "diffusion_pytorch_model.safetensors").stat().st_size  # bfloat16
    for name, value in packaged.guidance_unet.state_dict().items():
        original = guide.state_dict()[name]  # bfloat16-rounded, but for the float32 noise-level embeddings
        assert torch.equal(value, original.to(torch.bfloat16).float()) or torch.equal(value, original)
    with pytest.raises(SystemExit):
        package.main(["--trained", str(x0_model_dir), "--output", str(tmp_path / "x"), "--guidance-scale", "2"])
    section = load("model_report").modes_section(10, 1.0, 1.0, 2.5)
    assert "guidance_scale=2.5)" in section and "autoguidance" in section


def test_compare_models_pictures_every_model_on_the_reports_crops(tmp_path, x0_model_dir, capsys):
    from conftest import SAMPLES

    from diffusers_sr3 import SR3Pipeline

    other = SR3Pipeline.from_pretrained(x0_model_dir)
    torch.manual_seed(1)
    other.unet.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in other.unet.state_dict().items()})
    other.save_pretrained(tmp_path / "other")
    compare_models = load("compare_models")
    figure = compare_models.main(
        [
            "--model", f"first={x0_model_dir}", "--model", str(tmp_path / "other"),
            "--unseen", str(SAMPLES / "celebahq_16_128" / "hr_128"), "--unseen-crops", "3", "--crops", "4",
            "--crop-size", "32", "--rows", "2", "--steps", "2", "--eta", "1", "--output", str(tmp_path / "c.png"),
        ]
    )  # fmt: skip
    # bicubic | first | other | HR; 2 never-seen crops, 2 held-out crops and the flattest held-out crop.
    assert figure.size == (4 * 3 * 32, 5 * 3 * 32) and PIL.Image.open(tmp_path / "c.png").size == figure.size
    printed = capsys.readouterr().out
    assert "bicubic | first | other | HR" in printed
    lines = {line.split(":")[0].strip(): line for line in printed.splitlines() if "edge energy" in line}
    assert set(lines) == {"bicubic", "first", "other", "HR"} and "edge energy 1.000" in lines["HR"]
    assert lines["first"] != lines["other"]  # each model's own images
    with pytest.raises(FileNotFoundError, match="not a saved pipeline"):
        compare_models.main(["--model", f"x={tmp_path}", "--output", str(tmp_path / "d.png")])
    with pytest.raises(ValueError, match="given twice"):
        compare_models.named_models([f"a={x0_model_dir}", f"a={tmp_path / 'other'}"])


@pytest.mark.slow
def test_upscale_benchmark_measures_every_row(tmp_path, x0_model_dir, monkeypatch):
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    onnx = importlib.util.find_spec("onnxruntime") is not None
    rows = [
        "bicubic",
        "fidelity",
        "detail",
        "detail, unguided",
        "fidelity, self-ensemble",
        "fidelity, old tiling",
        "old model, old settings",
    ]
    rows += ["fidelity onnx"] if onnx else []
    report = load("upscale").main(
        [
            "--model", str(x0_model_dir), "--old-model", str(x0_model_dir), "--sizes", "8", "--photos", "1",
            "--steps", "4", "--max-measured-steps", "3", "--rows", *rows, "--tile-study", "16",
            "--output", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    assert not list(scratch.glob("upscale-benchmark-*"))  # its scratch folder (photos, models, cache) is gone
    measured = {row["row"]: row for row in report["rows"]}
    assert list(measured) == rows
    for name, row in measured.items():
        assert row["seconds_per_photo"] > 0 and 5 < row["psnr"] < 60 and row["megapixels"] == 32 * 32 / 1e6
        assert (row["peak_rss_gib"] is None) == (name == "bicubic")
        if name != "bicubic":
            assert 0.05 < row["peak_rss_gib"] < 8
    # Detail: 4 steps measured at 2 (the fewest that strength 0.6 refines) and 3 and extrapolated; the old
    # settings (strength 1): 10 steps at 1 and 3.
    assert measured["detail"]["extrapolated"] and measured["detail"]["measured_steps"] == [2, 3]
    assert measured["old model, old settings"]["measured_steps"] == [1, 3]
    assert measured["old model, old settings"]["steps"] == 10 and not measured["fidelity"]["extrapolated"]
    # Detail rows run the packaged model's detail settings; the unguided row turns autoguidance off on top, the
    # whole-image row its training-sized windows.
    module = load("upscale")
    options = argparse.Namespace(model="m", old_model="o")
    assert module.row_arguments("detail", options, 10) == ["--model", "m", "--mode", "detail", "--steps", "10"] + [
        "--eta=1",
        "--strength=0.6",
    ]
    assert module.row_arguments("detail, unguided", options, 10) == module.row_arguments("detail", options, 10) + [
        "--guidance-scale",
        "1",
    ]
    whole_image = module.row_arguments("detail, whole image", options, 10)
    assert whole_image == module.row_arguments("detail", options, 10) + ["--window-size", "0"]
    study = report["tile_study"]
    assert [row["tile"] for row in study] == ["untiled", 16] and study[1]["psnr_vs_untiled"] > 5
    written = json.loads((tmp_path / "out" / "upscale.json").read_text(encoding="utf-8"))
    assert [row["row"] for row in written["rows"]] == rows
    table = (tmp_path / "out" / "upscale.md").read_text(encoding="utf-8")
    assert "| 8->32 (0.0 MP) | detail, 4 steps |" in table and "(extrapolated)" in table and "Tile study" in table


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu(tmp_path, x0_model_dir):
    import os
    import subprocess
    import sys

    command = [
        "bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--eval-size", "32",
        "--upscale-size", "8", "--repeats", "1", "--variants", "fp32", "bf16", "fp32 channels_last",
        "--tests", "tests/test_device_agnostic.py::test_unet_on_the_device_matches_the_cpu",
        "--model", str(x0_model_dir), "--output", str(tmp_path / "report"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "gpu_check.json").read_text(encoding="utf-8"))
    assert report["device"] == "cpu" and report["tests"]["passed"] and "1 passed" in report["tests"]["summary"]
    assert [row["variant"] for row in report["evaluations"]] == ["fp32", "bf16", "fp32 channels_last"]
    assert all(row["seconds_per_eval"] > 0 for row in report["evaluations"])
    assert report["evaluations"][2]["relative_error_vs_fp32"] < 1e-4
    assert [row["mode"] for row in report["upscale"]] == ["fidelity", "detail"]
    assert all(row["passed"] and row["output"] == "32x32" for row in report["upscale"])
    assert "GPU readiness check on cpu" in (tmp_path / "report" / "gpu_check.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_gpu_quality_run_trains_evaluates_and_returns_outputs_for_fid_on_the_cpu(tmp_path, monkeypatch):
    """The device call's whole path, tiny: tiles, a wider network trained, packaged, evaluated, outputs saved; then
    FID of the returned outputs here, and the model from its kept parts. The packaged photographs are a carried
    folder, split as here by name."""
    from diffusers_sr3 import SR3Pipeline, photos

    monkeypatch.setattr(photos, "PHOTO_SOURCES", list(photos.PHOTO_SOURCES))  # the run replaces the list in place
    unseen, packaged = tmp_path / "unseen", tmp_path / "packaged"
    unseen.mkdir()
    packaged.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        PIL.Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(unseen / f"photo{index}.png")
    for name in ("aspen", "birch", "cedar", "maple"):
        PIL.Image.fromarray(rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)).save(packaged / f"{name}.png")
    out = tmp_path / "out"
    gpu_quality = load("gpu_quality")
    with pytest.raises(FileNotFoundError, match="--packaged-photos"):
        gpu_quality.main(["--output", str(out), "--packaged-photos", str(tmp_path / "missing")])
    tiny = ["--width", "32", "--max-steps", "3", "--batch-size", "2", "--workers", "0", "--checkpoint-every", "1"]
    tiny += ["--resolution", "32", "--max-side", "128", "--packaged-photos", str(packaged)]
    report = gpu_quality.main(
        ["--output", str(out), *tiny, "--crops", "3", "--unseen", str(unseen), "--unseen-crops", "3"]
        + ["--keep-model", str(tmp_path / "kept")]
    )
    held_out = photos.photo_split(sorted(packaged.iterdir()), heldout=0.25)[1]
    assert photos.packaged_photo_paths() == sorted(packaged.iterdir())
    assert report["heldout_photos"] == [photos.photo_name(path) for path in held_out]
    assert report["training"]["width"] == 32 and report["training"]["steps"] == 3
    assert 0 <= report["training"]["data_wait_fraction"] <= 1 and report["training"]["dataset_repeats"] == 10
    assert report["training"]["resolution"] == 32 and report["whole_photos"]  # the photos whole, as users run them
    # The guide: the checkpoint nearest 42% of the 3 steps, and detail mode guided at the shipped scale.
    assert report["training"]["guide_step"] == 1 and report["guidance_scale"] == 2.0
    # ... at the detail settings packaging stored in its config, the shipped model's.
    assert (report["steps"], report["eta"], report["strength"]) == (10, 1.0, 0.6)
    assert report["window_size"] == 32  # windows of the training crop's size
    assert set(report["sets"]) == {"held-out photos", "never-seen photos"}
    assert report["sets"]["never-seen photos"]["images"] == 3
    outputs = ["outputs_held-out-photos.npz", "outputs_never-seen-photos.npz"]  # one per set: each under 16 MiB
    assert {path.name for path in out.iterdir()} == {"report.json", "report.md", "evaluation.png", *outputs}
    methods = ["bicubic", "SR3 fidelity", "SR3 detail", "HR"]
    for name, file in zip(report["sets"], outputs):
        saved = np.load(out / file)
        assert sorted(saved.files) == sorted(f"{name}/{method}" for method in methods)
        assert saved[f"{name}/HR"].shape == (3, 3, 64, 64) and saved[f"{name}/HR"].dtype == np.uint8
    # The trained model, kept in parts for the calls that follow, comes back whole as it was evaluated.
    assert report["training"]["kept_model_parts"] == 1
    load("model_parts").send(str(tmp_path / "kept"), 1, str(tmp_path / "part1"))
    load("model_parts").unpack([str(tmp_path / "part1")], str(tmp_path / "model"))
    assert SR3Pipeline.from_pretrained(tmp_path / "model").unet.config.block_out_channels == 32
    with pytest.raises(SystemExit):  # before the training, not after
        gpu_quality.main(["--output", str(out), "--keep-model", str(tmp_path / "kept")])
    # Training only: the call's minutes go to training, and the kept model is evaluated here.
    with pytest.raises(SystemExit):
        gpu_quality.main(["--output", str(out), "--no-report"])
    trained = gpu_quality.main(
        ["--output", str(tmp_path / "trained"), *tiny, "--no-report", "--keep-model", str(tmp_path / "kept2")]
        + ["--finish-within", "300"]  # the training cut to end the call in time: less the 90 s kept around it
    )
    assert report["training"]["minutes"] == 5.5 and 3.0 < trained["training"]["minutes"] <= 3.5
    assert 0 < trained["training"]["seconds_before_training"] < trained["training"]["seconds"]
    with pytest.raises(RuntimeError, match="--finish-within 120 s leaves 0.0 minutes to train"):
        gpu_quality.main(["--output", str(tmp_path / "late"), *tiny, "--finish-within", "120"])
    assert list(trained) == ["training"] and trained["training"]["kept_model_parts"] == 1
    assert [path.name for path in (tmp_path / "trained").iterdir()] == ["report.json"]

    # Fine-tuning a packaged model as the shipped one travels to the device (its weights xz-compressed, its guide left
    # behind): the network is the model's, not --width's, and it comes back trained and unguided.
    def kept_model(name):
        load("model_parts").send(str(tmp_path / name), 1, str(tmp_path / f"{name}-part1"))
        load("model_parts").unpack([str(tmp_path / f"{name}-part1")], str(tmp_path / f"{name}-model"))
        return SR3Pipeline.from_pretrained(tmp_path / f"{name}-model")

    source = tmp_path / "source"
    shutil.copytree(tmp_path / "model", source)
    shutil.rmtree(source / "guidance_unet")
    weights = source / "unet" / "diffusion_pytorch_model.safetensors"
    (source / "unet" / f"{weights.name}.xz").write_bytes(lzma.compress(weights.read_bytes()))
    weights.unlink()
    with pytest.raises(SystemExit):
        gpu_quality.main(["--output", str(tmp_path / "tuned"), "--fine-tune", str(tmp_path / "missing")])
    tune = [*tiny, "--width", "64", "--no-report"]
    tuned = gpu_quality.main(
        ["--output", str(tmp_path / "tuned"), *tune, "--fine-tune", str(source), "--keep-model", str(tmp_path / "k3")]
    )
    assert tuned["training"]["fine_tuned"] and tuned["training"]["width"] == 32 and tuned["training"]["steps"] == 3
    start, result = SR3Pipeline.from_pretrained(tmp_path / "model"), kept_model("k3")
    assert result.guidance_unet is None and result.config.guidance_scale == 1.0
    assert result.config.residual_scale == start.config.residual_scale
    moved = [not torch.equal(a, b) for a, b in zip(start.unet.state_dict().values(), result.unet.state_dict().values())]
    assert len(moved) == len(start.unet.state_dict()) and any(moved)
    # A source that keeps its guide: the guide, a weaker model still, guides the fine-tuned one as it did the source.
    gpu_quality.main(
        ["--output", str(tmp_path / "tuned2"), *tune, "--fine-tune", str(tmp_path / "model")]
        + ["--keep-model", str(tmp_path / "k4")]
    )
    guided = kept_model("k4")
    assert guided.config.guidance_scale == 2.0
    for a, b in zip(start.guidance_unet.state_dict().values(), guided.guidance_unet.state_dict().values()):
        assert torch.equal(a, b)
    table = gpu_quality.main(["--fid-of", *(str(out / file) for file in outputs), "--output", str(tmp_path / "here")])
    assert table["never-seen photos"]["bicubic / bicubic"] == 1.0 and table["never-seen photos"]["SR3 detail"] > 0
    returned = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert json.loads((tmp_path / "here" / "report.json").read_text(encoding="utf-8")) == dict(returned, fid=table)


def test_training_launch_runs_the_script_under_accelerate_launch_with_the_cores_available(tmp_path):
    """Under a real `accelerate launch` (which sets OMP_NUM_THREADS=1), the default arm trains on every core."""
    report = load("training_launch").main(
        ["--preset", "tiny", "--steps", "2", "--batch", "2", "--resolution", "32", "--photos", "2"]
        + ["--arms", "one thread", "default", "--output", str(tmp_path)]
    )
    assert [(row["arm"], row["cpu_threads"]) for row in report["rows"]] == [
        ("one thread", 1),
        ("default", len(os.sched_getaffinity(0))),
    ]
    assert report["rows"][0]["speedup"] == 1.0 and all(row["steps_per_second"] > 0 for row in report["rows"])
    table = (tmp_path / "training_launch.md").read_text(encoding="utf-8")
    assert (
        "| one thread | 1 |" in table
        and json.loads((tmp_path / "training_launch.json").read_text(encoding="utf-8")) == report
    )


@needs_bfloat16_kernels
def test_training_throughput_times_every_network_batch_and_precision(tmp_path):
    throughput = load("training_throughput")
    tiny = throughput.network_config("tiny")
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        PIL.Image.fromarray(np.random.default_rng(index).integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(
            photos / f"{index}.png"
        )
    report = throughput.main(
        ["--networks", "tiny", "--steps", "1", "--batch", "2", "3", "--threads", "1", "--output", str(tmp_path)]
        + ["--loader", str(photos), "--loader-samples", "5"]
        + ["--loader-workers", "1", "--loader-batch", "2", "--loader-repeats", "2"]
    )
    assert report["loader"]["folder"] == "photos" and report["loader"]["samples_per_second"] > 0
    # The same passes over the 3 photos in each loader row: 4 epochs of 1 batch, or 2 epochs of 3 with 2 passes each.
    epochs = [(row["epochs"], row["batches_per_epoch"]) for row in report["loader"]["epochs"]]
    assert epochs == [(4, 1), (4, 1), (2, 3), (2, 3)] and report["loader"]["cached_samples_per_second"] > 0
    assert all(row["samples_per_second"] > 0 and row["first_batch_wait"] > 0 for row in report["loader"]["epochs"])
    assert "--dataset_repeats 2 --cache_images | 1 | 2 | 2 | 3 |" in (tmp_path / "training_throughput.md").read_text(
        encoding="utf-8"
    )
    rows = [(row["network"], row["batch"], row["precision"]) for row in report["rows"]]
    assert rows == [("tiny", 2, "float32"), ("tiny", 2, "bf16"), ("tiny", 3, "float32"), ("tiny", 3, "bf16")]
    for row in report["rows"]:
        assert row["seconds_per_step"] > 0
        assert row["images_per_second"] == pytest.approx(row["batch"] / row["seconds_per_step"])
        assert row["tflop_per_second"] == pytest.approx(row["gflop_per_image"] * row["images_per_second"] / 1000)
    assert report["rows"][0]["speedup"] == 1.0
    table = (tmp_path / "training_throughput.md").read_text(encoding="utf-8")
    # The trainer's EMA update, timed as a loop over the parameters and as one multi-tensor update.
    [ema] = report["ema"]
    assert ema["network"] == "tiny" and ema["tensors"] == len(list(throughput.SR3UNet2DModel(**tiny).parameters()))
    assert ema["loop_seconds"] > 0 and ema["foreach_seconds"] > 0
    assert f"| tiny | {ema['tensors']} | {ema['loop_seconds'] * 1000:.2f} |" in table
    assert throughput.network_config("previous")["channel_multipliers"] == (1, 2, 4, 8)
    # Twice the width, about four times the arithmetic per image.
    wide = throughput.network_config("tiny", width=2 * tiny["block_out_channels"])
    assert 3.5 < throughput.gflop_per_image(wide) / report["rows"][0]["gflop_per_image"] < 4.5
    assert "| tiny | 0.1M | 3 | bf16 |" in table and "one thread cuts" in table
    assert json.loads((tmp_path / "training_throughput.json").read_text(encoding="utf-8")) == report


def test_photo_tiles_copies_texture_tiles_only(tmp_path, monkeypatch):
    photo_tiles = load("photo_tiles")
    monkeypatch.setattr(photo_tiles, "packaged_photo_paths", lambda: [])
    monkeypatch.setattr(photo_tiles, "photo_split", lambda paths, heldout: ([], []))
    generator = torch.Generator().manual_seed(0)
    noise = (torch.rand(64, 64, 3, generator=generator) * 200 + 28).byte()  # detail finer than the x4 LR's pixels
    ramp = torch.linspace(28, 228, 64).round().byte().view(1, 64, 1).expand(64, 64, 3)  # all of it kept by the LR
    photo = tmp_path / "halves.png"
    PIL.Image.fromarray(torch.cat([noise, ramp], dim=1).numpy()).save(photo)
    output = tmp_path / "tiles"
    arguments = ["--output", str(output), "--extra", str(photo), "--tile", "64", "--stride", "64", "--scales", "128"]
    photo_tiles.main(arguments + ["--texture-copies", "2"])
    assert sorted(path.name for path in output.iterdir()) == [
        "halves_128_0000.png",
        "halves_128_0000_texture1.png",
        "halves_128_0000_texture2.png",
        "halves_128_0001.png",
    ]
    copy = PIL.Image.open(output / "halves_128_0000_texture2.png")
    assert torch.equal(torch.from_numpy(np.array(copy)), noise)
    summary = json.loads((tmp_path / "tiles.json").read_text(encoding="utf-8"))
    assert (summary["tiles"], summary["texture_tiles"], summary["texture_copies"]) == (2, 1, 2)
    plain = tmp_path / "plain"
    photo_tiles.main(["--output", str(plain), *arguments[2:]])
    assert sorted(path.name for path in plain.iterdir()) == ["halves_128_0000.png", "halves_128_0001.png"]
    with pytest.raises(SystemExit):
        photo_tiles.main(arguments + ["--texture-copies", "-1"])
    # In forked processes, a photograph each: the same tiles, byte for byte, and the same summary.
    second = tmp_path / "second.png"
    second.write_bytes(photo.read_bytes())
    grid = arguments[4:]  # the tile, stride and scale
    serial, forked = tmp_path / "serial", tmp_path / "forked"
    photo_tiles.main(["--output", str(serial), "--extra", str(photo), str(second), *grid, "--jobs", "1"])
    photo_tiles.main(["--output", str(forked), "--extra", str(photo), str(second), *grid, "--jobs", "2"])
    assert sorted(path.name for path in forked.iterdir()) == sorted(path.name for path in serial.iterdir())
    assert len(list(forked.iterdir())) == 4
    assert all((forked / path.name).read_bytes() == path.read_bytes() for path in serial.iterdir())
    assert (tmp_path / "forked.json").read_text(encoding="utf-8") == (tmp_path / "serial.json").read_text(
        encoding="utf-8"
    )
    # A corrupt photograph stops the run with its name, from a worker process as from this one.
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    for jobs in ("1", "2"):
        with pytest.raises((RuntimeError, ValueError), match="corrupt.png"):
            photo_tiles.main(
                ["--output", str(tmp_path / f"bad{jobs}"), "--extra", str(photo), str(tmp_path / "corrupt.png")]
                + [*grid, "--jobs", jobs]
            )


@pytest.mark.slow
def test_fid_references_score_the_saved_outputs_beside_references_made_from_the_hr(tmp_path):
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
    detail = rng.integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
    arrays = {"photos/HR": hr, "photos/bicubic": hr // 2 + 64, "photos/SR3 fidelity": hr, "photos/SR3 detail": detail}
    np.savez(tmp_path / "outputs_photos.npz", **arrays)
    report = load("fid_references").main(
        [str(tmp_path / "outputs_photos.npz"), "--gains", "1", "2", "--sigmas", "1.2", "--output", str(tmp_path / "r")]
    )
    rows = {row["output"]: row for row in report["rows"]}
    assert list(rows) == [
        "bicubic", "SR3 fidelity", "SR3 detail", "texture gain 1", "texture gain 2", "HR blurred, sigma 1.2",
        "fidelity + another crop's HR detail", "fidelity + its own HR detail",
    ]  # fmt: skip
    assert rows["bicubic"]["fid_x_first"] == 1.0 and rows["SR3 detail"]["fid"] > 0
    # Gain 1 is the detail sample itself; a fidelity answer equal to the HR gets its own detail back exactly.
    assert rows["texture gain 1"]["psnr"] == rows["SR3 detail"]["psnr"]
    assert rows["fidelity + its own HR detail"]["edges"] == pytest.approx(1.0, abs=0.01)
    assert rows["fidelity + its own HR detail"]["psnr"] > 45
    assert rows["HR blurred, sigma 1.2"]["edges"] < 0.5 and rows["fidelity + another crop's HR detail"]["psnr"] < 20
    assert {path.name for path in (tmp_path / "r").iterdir()} == {
        "fid_references.json", "fid_references.md", "fid_references.png"
    }  # fmt: skip
    np.savez(tmp_path / "two_sets.npz", **arrays, **{"faces/HR": hr})
    with pytest.raises(ValueError, match="not one set"):
        load("fid_references").main([str(tmp_path / "two_sets.npz"), "--output", str(tmp_path / "r2")])


def test_output_formats_measures_what_each_format_loses(tmp_path):
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)
    noisy = np.clip(hr.astype(int) + rng.integers(-20, 21, hr.shape), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "o.npz", **{"s/HR": hr, "s/bicubic": noisy, "s/SR3 fidelity": hr})
    report = load("output_formats").main([str(tmp_path / "o.npz"), "--output", str(tmp_path / "r")])
    rows = {(row["format"], row["quality"], row["method"]): row for row in report["rows"]}
    assert len(rows) == 10 and report["crops"] == 5
    assert rows[("PNG", "Pillow's default", "SR3 fidelity")]["psnr"] == float("inf")  # lossless: the HR itself
    assert rows[("PNG", "Pillow's default", "bicubic")]["lost_to_format"] == 0
    # Noise-like detail: Pillow's default JPEG loses more of it than quality 95 with full-resolution colour.
    default, high = rows[("JPEG", "Pillow's default", "bicubic")], rows[("JPEG", 95, "bicubic")]
    assert default["lost_to_format"] > high["lost_to_format"] > 0 and default["kib"] < high["kib"]
    assert (tmp_path / "r" / "output_formats.md").read_text(encoding="utf-8").count("| WEBP |") == 4


def test_sampler_probes_run_a_benchmark_with_their_replacement_and_put_the_pipeline_back(
    tmp_path, tiny_unet, monkeypatch
):
    """`sampler_probe.run_with_guidance`: the harness of the probes under results/samplers/ runs the named benchmark
    with every guided step made by the probe's rule, refuses projected guidance, and restores the pipeline after."""
    from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel, make_scheduler
    from diffusers_sr3.pipelines import base

    torch.manual_seed(1)
    guide = SR3UNet2DModel(**tiny_unet.config).eval()
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample")
    SR3Pipeline(tiny_unet, scheduler, guidance_unet=guide).save_pretrained(tmp_path / "m")
    harness = load("sampler_probe")
    monkeypatch.setenv("PROBE_SETTING", "3=0.5;2.5=1")
    setting = harness.setting_per_scale("PROBE_SETTING")
    assert (setting(3.0), setting(2.5)) == (0.5, 1.0)
    scales = []

    def unguided(prediction, guide_prediction, guidance_scale):
        scales.append(guidance_scale)
        return prediction

    plain = base.guided_prediction
    command = ["--model", str(tmp_path / "m"), "--crops", "2", "--crop-size", "32", "--output", str(tmp_path / "out")]
    harness.run_with_guidance(unguided, ["samplers", *command, "--entries", "ddim:3", "ddim:3:guidance_scale=3"])
    assert scales == [3.0] * 3  # the guided entry's 3 steps, and none of the unguided entry's
    rows = json.loads((tmp_path / "out" / "samplers.json").read_text(encoding="utf-8"))["rows"]
    assert rows[0]["psnr"] == pytest.approx(rows[1]["psnr"])  # a rule that drops the guidance samples unguided
    assert base.guided_prediction is plain
    projected = ["samplers", *command, "--entries", "ddim:3:guidance_scale=3:parallel_guidance_weight=0.5"]
    with pytest.raises(ValueError, match="plain autoguidance only"):
        harness.run_with_guidance(unguided, projected)
    assert base.guided_prediction is plain

    # An inherited classmethod (the full-resolution-head probe replaces SR3Pipeline.from_pretrained) is inherited
    # again after the run, not left behind as a bound copy.
    loaded = []
    inherited = SR3Pipeline.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        loaded.append(cls)
        return inherited(cls, *args, **kwargs)

    harness.run_benchmark(
        ["samplers", *command, "--entries", "ddim:3"], {(SR3Pipeline, "from_pretrained"): classmethod(from_pretrained)}
    )
    assert loaded == [SR3Pipeline]
    assert "from_pretrained" not in vars(SR3Pipeline)


def test_widened_network_probe_doubles_the_width_and_keeps_the_function():
    """`results/samplers/widened-network/widen.py`: every channel doubled (Net2WiderNet), the sinusoidal encoding's
    frequencies mapped, the attention logits kept, so the wide network predicts what the narrow one does."""
    from conftest import low_resolution_unet

    spec = importlib.util.spec_from_file_location(
        "widen_probe", REPO / "benchmarks" / "results" / "samplers" / "widened-network" / "widen.py"
    )
    widen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(widen)
    narrow = low_resolution_unet()
    with torch.no_grad():  # a network fresh from init has zero output layers: give every weight a value to carry
        for parameter in narrow.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    wide = widen.widen(narrow, split_noise=0.01, seed=0)
    assert wide.config.block_out_channels == 2 * narrow.config.block_out_channels
    assert sum(p.numel() for p in wide.parameters()) > 3 * sum(p.numel() for p in narrow.parameters())
    assert widen.prediction_difference(narrow, wide, seed=0) < 1e-4
    # Without the attention fix or the encoding map the function changes: the test can tell.
    shapes = {name: value.shape for name, value in wide.state_dict().items()}
    state = widen.widen_state_dict(narrow.state_dict(), shapes, narrow.config.block_out_channels, 0.01, 0)
    state = {
        name: value * math.sqrt(2) if name.endswith("attention.to_q.weight") else value for name, value in state.items()
    }
    wide.load_state_dict(state)
    assert widen.prediction_difference(narrow, wide, seed=0) > 1e-3


def test_shipped_photos_names_splits_and_shrinks_what_the_device_call_carries(tmp_path, monkeypatch):
    """`shipped_photos.py`: the packaged photographs by `photo_name`, held-out ones byte for byte and training ones
    at 1024 pixels; a package's photographs as `extra_<name>.jpg`, and a clear error for one it lacks."""
    from diffusers_sr3 import photos

    shipped = load("shipped_photos")
    installed = tmp_path / "installed"
    (installed / "Kite" / "contents" / "images").mkdir(parents=True)  # a Plasma wallpaper's layout
    rng = np.random.default_rng(0)
    files = [installed / f"{name}.png" for name in ("aspen", "birch", "cedar")]
    files.append(installed / "Kite" / "contents" / "images" / "2560x1600.png")
    for path in files:
        PIL.Image.fromarray(rng.integers(0, 256, (600, 1500, 3), dtype=np.uint8)).save(path)
    monkeypatch.setattr(photos, "PHOTO_SOURCES", [photos.PhotoSource("test photographs", str(installed))])
    split = shipped.write_packaged(tmp_path / "out" / "packaged")
    assert sorted(split["training"] + split["held_out"]) == ["Kite", "aspen", "birch", "cedar"]
    assert len(split["held_out"]) == 1
    for path in files:
        name = photos.photo_name(path)
        if name in split["held_out"]:
            assert (tmp_path / "out" / "packaged" / f"{name}.png").read_bytes() == path.read_bytes()
        else:
            with PIL.Image.open(tmp_path / "out" / "packaged" / f"{name}.jpg") as image:
                assert image.size == (1024, 410)
    # The carried folder splits as the installed photographs do.
    carried = photos.PhotoSource("carried", str(tmp_path / "out" / "packaged"))
    assert [photos.photo_name(p) for p in photos.photo_split(carried.paths(), heldout=0.25)[1]] == split["held_out"]

    downloads = tmp_path / "downloads"
    (downloads / "fakepkg__1.0" / "fakepkg" / "data").mkdir(parents=True)  # as `fetch` leaves an unpacked package
    PIL.Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(
        downloads / "fakepkg__1.0" / "fakepkg" / "data" / "quokka.png"
    )
    sources = [("pip", "fakepkg==1.0", [("fakepkg/data/quokka.png", "quokka")])]
    assert shipped.write_extras(tmp_path / "out" / "photos", downloads, sources) == ["quokka"]
    with PIL.Image.open(tmp_path / "out" / "photos" / "extra_quokka.jpg") as image:
        assert image.size == (80, 64)  # never enlarged
    missing = [("pip", "fakepkg==1.0", [("fakepkg/data/wombat.png", "wombat")])]
    with pytest.raises(FileNotFoundError, match="fakepkg==1.0 has no fakepkg/data/wombat.png"):
        shipped.write_extras(tmp_path / "out" / "photos", downloads, missing)


def test_model_parts_bring_a_packaged_model_back_in_parts_that_fit_a_device_return(tmp_path, tiny_unet):
    """`model_parts.py`: a bf16 pipeline folder cut into shards and planned into parts under a call's return limits,
    sent part by part as the device runs it, and unpacked here byte for byte; broken returns are named."""
    from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel, make_scheduler

    parts_module, package = load("model_parts"), load("package_model")
    torch.manual_seed(1)
    guide = package.to_bfloat16(SR3UNet2DModel(**tiny_unet.config).eval())
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample")
    model = tmp_path / "model"
    SR3Pipeline(package.to_bfloat16(tiny_unet), scheduler, guidance_unet=guide).save_pretrained(model)
    with pytest.raises(FileNotFoundError, match="not a pipeline folder"):
        parts_module.pack(str(model / "scheduler"), str(tmp_path / "nothing"))
    limits = dict(max_file_bytes=60_000, max_part_bytes=200_000, max_part_files=4)
    manifest = parts_module.pack(str(model), str(tmp_path / "kept"), **limits)
    with pytest.raises(FileExistsError):
        parts_module.pack(str(model), str(tmp_path / "kept"))
    assert sorted(manifest["shards"]) == ["guidance_unet", "unet"] and len(manifest["parts"]) >= 2
    assert all(len(shards) >= 2 for shards in manifest["shards"].values())  # each model over one file's limit
    returned = []
    for part in range(1, len(manifest["parts"]) + 1):
        folder = tmp_path / f"returned{part}"
        parts_module.main(["send", str(tmp_path / "kept"), "--part", str(part), "--output", str(folder)])
        sizes = [file.stat().st_size for file in folder.iterdir()]
        assert len(sizes) <= 4 and sum(sizes) <= 200_000 and max(sizes) <= 60_000
        returned.append(str(folder))
    with pytest.raises(ValueError, match="parts 1 to"):
        parts_module.send(str(tmp_path / "kept"), len(returned) + 1, str(tmp_path / "extra"))
    # Any order of the returned parts rebuilds the folder, byte for byte.
    parts_module.main(["unpack", *reversed(returned), "--output", str(tmp_path / "back")])

    def files(folder):
        return {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}

    assert files(model) == files(tmp_path / "back")
    loaded = SR3Pipeline.from_pretrained(tmp_path / "back")
    assert loaded.guidance_unet is not None and loaded.scheduler.config.prediction_type == "sample"
    with pytest.raises(FileExistsError):
        parts_module.unpack(returned, str(tmp_path / "back"))
    # A missing part, and a file broken on the way, are named; nothing is left half-written.
    with pytest.raises(FileNotFoundError, match=r"parts \[2\] of"):
        parts_module.unpack(returned[:1] + returned[2:], str(tmp_path / "partial"))
    shard = next(path for path in pathlib.Path(returned[-1]).iterdir() if path.suffix == ".safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        parts_module.unpack(returned, str(tmp_path / "broken"))
    assert not any(path.name.startswith((".unpack-", "partial", "broken")) for path in tmp_path.iterdir())


class _SharpnessFeatures(torch.nn.Module):
    """A fast stand-in for the Inception network: each channel's mean, spread and mean gradient magnitude."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.double()
        gradients = (images[..., 1:, :] - images[..., :-1, :]).abs().mean(dim=(2, 3))
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3)), gradients], dim=1)


class _NoNetwork(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the features should have come from the cache")


def test_fid_infinity_benchmark_scores_every_saved_method_against_the_hr(tmp_path, monkeypatch):
    script = load("fid_infinity")
    monkeypatch.setattr(script, "InceptionFeatures", _SharpnessFeatures)
    generator = torch.Generator().manual_seed(0)
    hr = torch.randint(0, 256, (48, 3, 16, 16), generator=generator, dtype=torch.uint8)
    blurred = torch.nn.functional.avg_pool2d(hr.double(), 3, stride=1, padding=1).round().to(torch.uint8)
    outputs = tmp_path / "outputs_toy.npz"
    np.savez_compressed(outputs, **{"toy/bicubic": blurred.numpy(), "toy/copy": hr.numpy(), "toy/HR": hr.numpy()})

    cache = tmp_path / "features"
    report = script.main([str(outputs), "--draws", "2", "--cache", str(cache), "--output", str(tmp_path / "fid")])

    (scored,) = report["sets"]
    assert scored["set"] == "toy" and scored["crops"] == 48
    bicubic, copy = scored["rows"]
    assert [bicubic["method"], copy["method"]] == ["bicubic", "copy"]
    features = script.inception_features(blurred, network=_SharpnessFeatures())
    reference = script.inception_features(hr, network=_SharpnessFeatures())
    assert bicubic["fid"] == pytest.approx(frechet_distance(features, reference))
    assert bicubic["fid"] > 1 and bicubic["fid_x_first"] == 1 and bicubic["fid_infinity_x_first"] == 1
    assert [size for size, _ in bicubic["points"]] == [12, 12, 18, 18, 24, 24, 30, 30, 36, 36, 42, 42, 48]
    assert abs(copy["fid"]) < 1e-6 and abs(copy["fid_infinity"]) < 1e-6  # the HR itself, at every size
    saved = json.loads((tmp_path / "fid" / "fid_infinity.json").read_text(encoding="utf-8"))
    assert saved["sets"][0]["rows"][0]["fid_infinity"] == pytest.approx(bicubic["fid_infinity"])
    table = (tmp_path / "fid" / "fid_infinity.md").read_text(encoding="utf-8")
    assert "| toy (48 crops) | bicubic |" in table and "| toy: crops | bicubic | copy |" in table
    assert f"| 48 | {bicubic['fid']:.1f} (1.000x) | " in table  # by crop count: all 48, the FID over every crop

    # A rerun over other sizes takes the features from the cache: the network is not run again.
    assert len(list(cache.iterdir())) == 2  # the HR and its copy are the same images: one entry
    monkeypatch.setattr(script, "InceptionFeatures", _NoNetwork)
    again = script.main([str(outputs), "--sizes", "24", "48", "--cache", str(cache), "--output", str(tmp_path / "b")])
    assert again["sets"][0]["rows"][0]["fid"] == pytest.approx(bicubic["fid"])
    assert [size for size, _ in again["sets"][0]["rows"][0]["points"]] == [24, 24, 24, 24, 48]


def test_photo_tiles_names_the_photo_sources_it_skipped(tmp_path, monkeypatch, capsys):
    """Without some photo sources the tiles are another dataset: the script says which, and what provides each."""
    from diffusers_sr3 import photos

    present, partial = tmp_path / "present", tmp_path / "partial"
    rng = np.random.default_rng(0)
    for path in (present / "a.png", present / "b.png", present / "c.png", partial / "d.png"):
        path.parent.mkdir(exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    sources = [
        photos.PhotoSource("present photos", str(present)),
        photos.PhotoSource("partial photos", str(partial), ("d.png", "gone.png"), provider="the partial kit"),
        photos.PhotoSource(
            "a package's photos", "data", ("x.jpg",), package="no_such_sr3_package", provider="pip install nosuch"
        ),
        photos.PhotoSource("wallpapers", str(tmp_path / "absent"), ("y.jpg",), provider="the Debian package walls"),
    ]
    monkeypatch.setattr(photos, "PHOTO_SOURCES", sources)
    output = tmp_path / "tiles"
    load("photo_tiles").main(
        ["--output", str(output), "--tile", "64", "--stride", "64", "--scales", "64", "--jobs", "1"]
    )
    error = capsys.readouterr().err
    assert "'present photos'" not in error
    assert "skipped photo source 'partial photos': only 1 of its 2 photographs found (provided by the partial kit)" in (
        error
    )
    assert 'skipped photo source "a package\'s photos": not installed (provided by pip install nosuch)' in error
    assert "skipped photo source 'wallpapers': not installed (provided by the Debian package walls)" in error
    summary = json.loads((tmp_path / "tiles.json").read_text(encoding="utf-8"))
    assert len(summary["missing_photo_sources"]) == 3 and summary["tiles"] > 0


def test_input_listing_benchmark_times_both_listings(tmp_path, capsys):
    results = load("input_listing").main(["--files", "30", "--folders", "3", "--runs", "1", "--dir", str(tmp_path)])
    assert set(results) == {"find_image_sources", "find_image_sources under hold_folders_for_reading"}
    assert all(set(times) == {"wall_median_s", "cpu_min_s"} for times in results.values())
    assert all(times["wall_median_s"] > 0 for times in results.values())
    assert "30 files in 3 folder(s)" in capsys.readouterr().out
    assert os.listdir(tmp_path) == []  # the tree is removed
