"""The benchmark scripts run end to end (tiny settings) and report every section they promise."""

import importlib.util
import json

import pytest
from conftest import REPO


def load(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_speed_benchmark_reports_every_section(tmp_path):
    run = load("run")
    report = run.main(
        [
            "--preset", "tiny", "--repeats", "1", "--warmup", "0", "--schedules", "ddim:3", "ddpm:20",
            "--max-measured-steps", "3", "--train-batch", "2", "--train-steps", "1", "--resolutions", "32", "64",
            "--train-variants", "fp32 NCHW (plain)", "bf16 autocast + channels_last + fused Adam + checkpointing",
            "--peak-channels", "32",
            "--batches", "1", "2", "--output", str(tmp_path),
        ]
    )  # fmt: skip
    assert report["parameters_m"] > 0 and report["gflop_per_eval"] > 0
    assert set(report["machine"]["conv_peak_gflops"]) == {"float32", "bfloat16"}
    variants = [row["variant"] for row in report["inference"]]
    assert variants[0] == "fp32 NCHW (plain)" and "bf16 channels_last" in variants
    assert report["inference"][0]["speedup_vs_plain_fp32"] == 1.0
    assert all(row["relative_error_vs_fp32"] < 0.05 for row in report["inference"])
    assert [row["measured"] for row in report["pipeline"]] == [True, False]
    assert len(report["training"]) == 2 and report["training"][0]["speedup_vs_plain_fp32"] == 1.0
    assert all(row["peak_rss_gib"] > 0 for row in report["training"])
    assert {(row["resolution"], row["batch"]) for row in report["scaling"]} == {(32, 1), (32, 2), (64, 1), (64, 2)}
    written = json.loads((tmp_path / "run.json").read_text())
    assert written["fastest_variant"] == report["fastest_variant"]
    table = (tmp_path / "run.md").read_text()
    assert "| inference variant |" in table and "Training step" in table and "Scaling" in table


@pytest.mark.slow
def test_model_report_evaluates_and_writes_the_card(tmp_path, tiny_pipeline):
    import yaml
    from conftest import SHARED

    tiny_pipeline.save_pretrained(tmp_path / "model")
    report = load("model_report").main(
        [
            "--model", str(tmp_path / "model"), "--faces", str(SHARED / "data" / "original_samples"),
            "--face-size", "64", "--crop-size", "32", "--crops", "4", "--steps", "2", "--output", str(tmp_path / "r"),
            "--write-card", "--training-command", "python benchmarks/convergence.py --steps 3000 --output model",
        ]
    )  # fmt: skip
    faces = report["sets"]["original's sample faces"]
    assert faces["images"] == 9 and faces["size"] == 64  # 64px output from a 32px-trained model: tiled
    for evaluated in report["sets"].values():
        for method in ("SR3", "bicubic"):
            values = evaluated["results"][method]
            assert {"psnr", "ssim", "consistency", "colour_error", "edge_ratio", "fid"} <= set(values)
    assert (tmp_path / "r" / "evaluation.png").exists() and (tmp_path / "model" / "evaluation.png").exists()
    card = (tmp_path / "model" / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert {m["type"] for m in metadata["model-index"][0]["results"][0]["metrics"]} >= {"psnr", "ssim", "fid"}
    assert "held-out photos" in card and "original's sample faces" in card and "convergence.py --steps 3000" in card
