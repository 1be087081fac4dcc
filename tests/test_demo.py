"""`sr3 demo` end to end with a tiny step count: packaged photos, training core, held-out evaluation, pictures."""

import json
import math

import PIL.Image
import pytest
import torch

from diffusers_sr3 import SR3Pipeline
from diffusers_sr3.cli import main
from diffusers_sr3.commands import demo
from diffusers_sr3.image_processing import images_to_tensor, upsample_condition


def test_demo_trains_and_reports_on_held_out_photos(tmp_path, capsys, monkeypatch):
    # What each method is given: SR3's low-resolution input, and the arguments of every evaluation.
    sr3_inputs, evaluated = [], []
    real_call, real_evaluate = SR3Pipeline.__call__, demo.metrics.evaluate_batch
    monkeypatch.setattr(
        SR3Pipeline, "__call__", lambda self, image, **kw: sr3_inputs.append(image) or real_call(self, image, **kw)
    )
    monkeypatch.setattr(demo.metrics, "evaluate_batch", lambda *a: evaluated.append(a) or real_evaluate(*a))
    out = tmp_path / "demo"
    arguments = ["demo", "--output", str(out), "--steps", "2", "--width", "8", "--crop-size", "16"]
    arguments += ["--train-crops", "16", "--eval-crops", "2", "--inference-steps", "2", "--photo-size", "40"]
    assert main(arguments + ["--batch-size", "4"]) == 0
    # SR3 and bicubic start from the same 8-bit low-resolution pixels (SR3 takes pictures, uint8).
    sr3_low = images_to_tensor(next(image for image in sr3_inputs if isinstance(image, list)))  # the held-out crops
    held_out = [call for call in evaluated if call[1].shape[0] == 2]  # the 2 crops (validation in training has 1)
    (_, hr, sr3_lr), (bicubic, _, bicubic_lr) = held_out[:2]  # SR3, then bicubic
    assert torch.equal(bicubic_lr, sr3_low) and torch.equal(sr3_lr, sr3_low)
    assert torch.equal(bicubic, upsample_condition(sr3_low, tuple(hr.shape[-2:])))
    printed = capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    assert report["steps"] == 2
    assert not set(report["train_photos"]) & set(report["heldout_photos"])
    assert set(report["mean"]) == {"SR3", "bicubic", demo.PACKAGED}  # the model that ships in the package too
    for method in ("SR3", "bicubic", demo.PACKAGED):
        assert set(report["per_image"][method]) == {"psnr", "ssim", "consistency"}
        assert all(len(values) == 2 for values in report["per_image"][method].values())
        assert all(math.isfinite(value) for value in report["mean"][method].values())
    # Bicubic on real photo crops is a sane baseline; the verdict states what was measured.
    assert 15 < report["mean"]["bicubic"]["psnr"] < 45
    assert report["verdict"] in printed and report["verdict"] in (out / "metrics.md").read_text()
    # LR | bicubic | SR3 | packaged SR3 | HR per row
    assert PIL.Image.open(out / "comparison.png").size == (5 * 16, 2 * 16)
    # A whole held-out photo (longer side 40, larger than the 16x16 the model was trained at, so tiled).
    photo = PIL.Image.open(out / "photo.png")
    assert photo.width % 5 == 0 and max(photo.width // 5, photo.height) == 40
    assert (out / "model" / "model_index.json").is_file()
    # The trained model is a normal pipeline folder: `sr3 upscale` takes it.
    assert (
        main(
            ["upscale", str(out / "comparison.png"), "--model", str(out / "model"), "--steps", "1"]
            + ["--output", str(tmp_path / "up.png")]
        )
        == 0
    )
    assert PIL.Image.open(tmp_path / "up.png").size == (4 * 80, 4 * 32)
    # An existing demo is not overwritten silently.
    assert main(arguments) == 2


def test_verdict_states_what_was_measured():
    bicubic = {"psnr": 25.0, "ssim": 0.7, "consistency": 1e-4}
    assert demo._verdict({"psnr": 26.0, "ssim": 0.8, "consistency": 5e-5}, bicubic).startswith(
        "SR3 beats bicubic on all"
    )
    assert "does not beat" in demo._verdict({"psnr": 20.0, "ssim": 0.5, "consistency": 1e-3}, bicubic)
    assert demo._verdict({"psnr": 24.0, "ssim": 0.75, "consistency": 1e-3}, bicubic) == (
        "SR3 beats bicubic on ssim only, at this training budget."
    )


def test_minutes_size_the_run_from_a_timed_step(tmp_path, monkeypatch):
    pytest.importorskip("skimage")
    measured = demo._seconds_per_step(demo.unet_config(16, 4), batch_size=2)
    assert 0 < measured < 60
    monkeypatch.setattr(demo, "_seconds_per_step", lambda config, batch_size: 0.5)
    out = tmp_path / "demo"
    arguments = ["demo", "--output", str(out), "--minutes", "0.13", "--width", "4", "--crop-size", "16"]
    arguments += ["--train-crops", "8", "--eval-crops", "1", "--inference-steps", "1", "--photo-size", "16"]
    assert main(arguments + ["--batch-size", "2"]) == 0
    # 0.13 min = 7.8 s at 0.5 s per step x the loop overhead 1.3 -> 12 steps
    assert json.loads((out / "metrics.json").read_text())["steps"] == 12
