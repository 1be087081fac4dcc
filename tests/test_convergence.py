"""benchmarks/convergence.py: its metrics, its settings, and one tiny end-to-end run through the training core."""

import importlib.util
import json
import pathlib

import pytest
import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "convergence.py"


@pytest.fixture(scope="module")
def convergence():
    spec = importlib.util.spec_from_file_location("convergence_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _images(seed=0, size=16):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, 3, size, size, generator=generator) * 1.6 - 0.8


def test_metrics_of_a_perfect_and_a_shifted_output(convergence):
    from diffusers_sr3.image_processing import degrade

    hr = _images()
    lr, bicubic = degrade(hr, 4)
    perfect = convergence.image_quality(hr, hr, lr)
    assert perfect["colour_error"] == [0.0, 0.0, 0.0]
    assert perfect["edge_ratio"] == pytest.approx(1.0)
    assert perfect["psnr"] == float("inf") and perfect["ssim"] == pytest.approx(1.0)
    # A green cast of 10/255 shows up in the green channel only; a flat output has no edges.
    shifted = hr.clone()
    shifted[:, 1] += 20 / 255
    assert convergence.image_quality(shifted, hr, lr)["colour_error"] == pytest.approx([0.0, 10.0, 0.0], abs=0.01)
    flat = hr.mean(dim=(2, 3), keepdim=True).expand_as(hr)
    assert convergence.image_quality(flat, hr, lr)["edge_ratio"] == pytest.approx(0.0, abs=1e-9)
    # Bicubic upsampling blurs: less edge energy than the original.
    assert convergence.image_quality(bicubic, hr, lr)["edge_ratio"] < 1.0


def test_targets_follow_the_issue(convergence):
    bicubic = dict(psnr=28.0, ssim=0.7, consistency=1e-4, colour_error=[0.1, 0.1, 0.1], edge_ratio=0.6)
    good = dict(psnr=26.0, ssim=0.72, consistency=2e-4, colour_error=[1.0, 1.5, 0.5], edge_ratio=0.9)
    assert all(convergence.targets(good, bicubic, steps=500).values())
    assert not convergence.targets(good, bicubic, steps=3000)["psnr >= bicubic - 1.5 dB"]
    bad = dict(good, colour_error=[0.1, 2.5, 0.1], consistency=4e-4, edge_ratio=1.5)
    result = convergence.targets(bad, bicubic, steps=500)
    assert not result["colour error <= 2/255"] and not result["consistency <= 3x bicubic"]
    assert not result["edges closer to HR than bicubic"]


def test_ablations_change_one_setting_each(convergence):
    original = convergence.ORIGINAL
    # Options that only accompany a change (a warm-up with a learning rate, the target of a residual output).
    companions = {"lr_scheduler", "lr_warmup_steps", "ema_decay", "ema_use_warmup"}
    for name, (description, change) in convergence.ABLATIONS.items():
        assert description
        assert all(original.get(key) != value for key, value in change.items()), name
        if name != "original":
            assert len(change.keys() - companions - {"prediction_type"}) <= 1 and change, name
    assert convergence.ABLATIONS["residual_sample"][1]["prediction_type"] == "sample"
    assert set(convergence.RECOMMENDED) >= set(original)
    config = convergence.unet_config(64, 32, original)
    assert config["attention_resolutions"] == (8,) and config["channel_multipliers"] == (1, 2, 4, 8)
    assert config["noise_level_embedding_scale"] == 1.0 and config["dropout"] == 0.0
    assert convergence.RECOMMENDED["residual"] is True and convergence.RECOMMENDED["prediction_type"] == "sample"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "at least 1"),
        (["--crop-size", "20"], "multiple of 8"),
        (["--ablation", "original", "ema", "--output", "x"], "at most one"),
        (["--ablation", "nope"], "invalid choice"),
    ],
)
def test_bad_arguments_are_refused(convergence, capsys, argv, message):
    with pytest.raises(SystemExit):
        convergence.parse_args(argv)
    assert message in capsys.readouterr().err


def test_list_names_every_ablation(convergence, capsys):
    assert convergence.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in convergence.ABLATIONS) and "recommended" in listed


@pytest.mark.slow
def test_tiny_end_to_end_run_reports_every_column_and_saves_a_pipeline(convergence, tmp_path, capsys):
    from diffusers_sr3 import SR3Pipeline

    output, report = tmp_path / "pipeline", tmp_path / "report"
    argv = ["--steps", "3", "2", "--crop-size", "16", "--width", "8", "--train-crops", "32", "--eval-crops", "3"]
    argv += ["--inference-steps", "2", "--output", str(output), "--report", str(report), "--ablation", "v_prediction"]
    assert convergence.main(argv) == 0

    table = (report / "results.md").read_text(encoding="utf-8")
    header = table.splitlines()[0]
    assert all(column in header for column in convergence.COLUMNS)
    assert "| v_prediction | 2 |" in table and "| v_prediction | 3 |" in table and "| bicubic |" in table
    assert table in capsys.readouterr().out
    results = json.loads((report / "results.json").read_text(encoding="utf-8"))
    # One run, measured at 2 steps and then resumed from its checkpoint to 3.
    first, run = results["runs"]
    assert (first["steps"], run["steps"]) == (2, 3)
    assert json.loads((output / "training_summary.json").read_text(encoding="utf-8"))["steps_this_run"] == 1
    for values in (run["sr3"], results["bicubic"]):
        assert set(values) == {"psnr", "ssim", "consistency", "colour_error", "edge_ratio", "flat_grain"}
        assert len(values["colour_error"]) == 3
    assert run["seconds_per_step"] > 0 and len(run["targets"]) == 5
    assert run["settings"]["prediction_type"] == "v_prediction"
    assert not set(results["photos"]["train"]) & set(results["photos"]["heldout"])
    assert (report / "samples_v_prediction_2.png").is_file() and (report / "samples_v_prediction_3.png").is_file()

    pipeline = SR3Pipeline.from_pretrained(output)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    assert pipeline.unet.config.block_out_channels == 8 and pipeline.config.upscale_factor == 4
    image = pipeline(torch.rand(1, 3, 4, 4), num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 16, 16)
