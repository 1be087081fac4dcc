"""`sr3 eval` on the shared image pairs and the original's results layout."""

import json
import shutil

import PIL.Image
import pytest
from conftest import PAIRS, SAMPLES

from diffusers_sr3 import metrics
from diffusers_sr3.cli import main

FFHQ = SAMPLES / "ffhq_64_512"


def load(path):
    return metrics.to_uint8_rgb(PIL.Image.open(path))


@pytest.fixture
def pair_folders(tmp_path):
    """hr/<name>.png and sr/<name>.png from the metric pairs fixtures (some 128x128, one 512, one 37x53)."""
    for path in PAIRS.glob("*_hr.png"):
        name = path.name[: -len("_hr.png")]
        (tmp_path / "hr").mkdir(exist_ok=True)
        (tmp_path / "sr").mkdir(exist_ok=True)
        shutil.copy(path, tmp_path / "hr" / f"{name}.png")
        shutil.copy(PAIRS / f"{name}_sr.png", tmp_path / "sr" / f"{name}.png")
    return tmp_path


def test_folders_matched_by_name_table_and_json(pair_folders, capsys):
    report_path = pair_folders / "reports" / "metrics.json"
    hr, sr = pair_folders / "hr", pair_folders / "sr"
    assert main(["eval", "--hr", str(hr), "--sr", str(sr), "--json", str(report_path)]) == 0
    table = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["count"] == 8 and set(report["images"]) == {p.stem for p in hr.iterdir()}
    for name, values in report["images"].items():
        expected = metrics.psnr(load(sr / f"{name}.png"), load(hr / f"{name}.png"))
        assert values["psnr"] == ("inf" if expected == float("inf") else pytest.approx(expected, abs=1e-9))
        assert values["ssim"] == pytest.approx(metrics.ssim(load(sr / f"{name}.png"), load(hr / f"{name}.png")))
    assert report["images"]["identical_128"] == {"psnr": "inf", "ssim": 1.0}
    assert report["mean"]["psnr"] == "inf"  # one identical pair: the mean is infinite, as the original's
    assert "odd_37x53_noise_s15" in table and table.splitlines()[-1].startswith("mean")
    finite = [v["ssim"] for v in report["images"].values()]
    assert report["mean"]["ssim"] == pytest.approx(sum(finite) / len(finite))


def test_upscale_outputs_match_their_sources_and_lr_adds_consistency(tmp_path):
    for kind, folder in (("hr", "hr_512"), ("sr", "sr_64_512"), ("lr", "lr_64")):
        (tmp_path / kind).mkdir()
        for path in sorted((FFHQ / folder).glob("*.png"))[:2]:
            # SR files named like `sr3 upscale` names them: <name>_sr.png
            shutil.copy(path, tmp_path / kind / (f"{path.stem}_sr.png" if kind == "sr" else path.name))
    report_path = tmp_path / "r.json"
    arguments = ["eval", "--hr", str(tmp_path / "hr"), "--sr", str(tmp_path / "sr"), "--lr", str(tmp_path / "lr")]
    assert main(arguments + ["--json", str(report_path), "--quiet"]) == 0
    report = json.loads(report_path.read_text())
    assert set(report["images"]) == {"00030", "00031"}
    for name, values in report["images"].items():
        sr, lr = load(tmp_path / "sr" / f"{name}_sr.png"), load(tmp_path / "lr" / f"{name}.png")
        assert values["consistency"] == pytest.approx(metrics.consistency(sr, lr))
        assert 0 < values["consistency"] < 1e-3  # these SR images are bicubic upsamples of the LR images


def test_original_results_layout_with_bicubic_baseline(tmp_path, capsys):
    for path in sorted((FFHQ / "hr_512").glob("*.png"))[:2]:
        step_id = f"1000_{path.stem}"  # the original names results <step>_<index>_<kind>.png
        shutil.copy(path, tmp_path / f"{step_id}_hr.png")
        shutil.copy(FFHQ / "sr_64_512" / path.name, tmp_path / f"{step_id}_sr.png")
        shutil.copy(FFHQ / "sr_64_512" / path.name, tmp_path / f"{step_id}_inf.png")
        shutil.copy(FFHQ / "lr_64" / path.name, tmp_path / f"{step_id}_lr.png")
    report_path = tmp_path / "out.json"
    assert main(["eval", "--results", str(tmp_path), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["count"] == 2
    for values in report["images"].values():
        assert set(values) == {"psnr", "ssim", "consistency", "bicubic_psnr", "bicubic_ssim"}
        assert values["bicubic_psnr"] == values["psnr"]  # the "SR" here is the bicubic image itself
    assert "consistency" in capsys.readouterr().out


def test_unmatched_and_mismatched_pairs_are_named(pair_folders, capsys):
    hr, sr = pair_folders / "hr", pair_folders / "sr"
    (sr / "blur_r2_128.png").unlink()
    shutil.copy(PAIRS / "identical_128_hr.png", sr / "stray.png")
    assert main(["eval", "--hr", str(hr), "--sr", str(sr)]) == 2
    error = capsys.readouterr().err
    assert "1 HR image(s) have no SR image: blur_r2_128" in error and "1 SR image(s) have no HR image: stray" in error

    (sr / "stray.png").unlink()
    shutil.copy(PAIRS / "blur_r2_128_sr.png", sr / "blur_r2_128.png")
    shutil.copy(PAIRS / "odd_37x53_noise_s15_sr.png", sr / "noise_s10_512.png")
    assert main(["eval", "--hr", str(hr), "--sr", str(sr)]) == 2
    error = capsys.readouterr().err
    assert "differ in size: noise_s10_512 (hr 512x512, sr 53x37)" in error


def test_bad_arguments(pair_folders, tmp_path, capsys):
    hr = pair_folders / "hr"
    assert main(["eval", "--hr", str(hr), "--sr", str(tmp_path / "missing")]) == 2
    assert "--sr folder not found" in capsys.readouterr().err
    assert main(["eval", "--hr", str(hr)]) == 2
    assert "give --hr and --sr folders" in capsys.readouterr().err
    (pair_folders / "sr" / "blur_r2_128.png").write_bytes(b"not a png")
    assert main(["eval", "--hr", str(hr), "--sr", str(pair_folders / "sr")]) == 2
    error = capsys.readouterr().err
    assert "cannot read image" in error and "blur_r2_128.png" in error
    assert main(["eval", "--hr", str(hr), "--sr", str(hr), "--inception-score"]) == 2
    assert "classifier" in capsys.readouterr().err


def test_fid_option(tmp_path):
    for kind, folder in (("hr", "hr_512"), ("sr", "sr_64_512")):
        (tmp_path / kind).mkdir()
        for path in sorted((FFHQ / folder).glob("*.png"))[:2]:
            PIL.Image.open(path).resize((128, 128)).save(tmp_path / kind / path.name)
    report_path = tmp_path / "r.json"
    # (FID of a set against itself is ~0: tests/test_metrics.py; one Inception load per test keeps this short.)
    arguments = ["eval", "--hr", str(tmp_path / "hr"), "--sr", str(tmp_path / "sr"), "--fid", "--json"]
    assert main(arguments + [str(report_path)]) == 0
    assert json.loads(report_path.read_text())["fid"] > 1
