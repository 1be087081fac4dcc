"""`sr3 eval` on the shared image pairs and the original's results layout."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
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
    report = json.loads(report_path.read_text(encoding="utf-8"))
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
    report = json.loads(report_path.read_text(encoding="utf-8"))
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
    report = json.loads(report_path.read_text(encoding="utf-8"))
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
    assert main(["eval", "--hr", str(hr), "--sr", str(pair_folders / "sr"), "--inception-score"]) == 2
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
    assert json.loads(report_path.read_text(encoding="utf-8"))["fid"] > 1


def test_fid_is_never_negative_and_names_its_image_count(pair_folders, monkeypatch, capsys):
    """Identical sets of 3 printed a bare `fid: -4.6e-05`: a distance below 0, and no word that FID over a few images
    compares only with FIDs over as many."""

    class RoundingFID:
        def update(self, images, real):
            pass

        def compute(self):
            return torch.tensor(-4.6e-05)

    monkeypatch.setattr(metrics, "frechet_inception_distance", lambda device: RoundingFID())
    report_path = pair_folders / "r.json"
    arguments = ["eval", "--hr", str(pair_folders / "hr"), "--sr", str(pair_folders / "sr"), "--fid", "--quiet"]
    assert main(arguments + ["--json", str(report_path)]) == 0
    count = len(list((pair_folders / "hr").glob("*.png")))
    output = capsys.readouterr().out
    assert "fid: 0\n" in output
    assert f"(fid over {count} image pairs, fewer than the 2048 features: biased upward, it compares only" in output
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["fid"] == 0.0 and report["fid_images"] == count


def write_noise(path, size, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_lr_images_must_be_the_hr_shrunk_by_a_whole_factor(tmp_path, monkeypatch, capsys):
    lr_sizes = {"a": (16, 16), "b": (48, 48), "c": (20, 20), "d": (96, 96), "e": (24, 12), "f": (24, 24)}
    for index, (name, lr_size) in enumerate(lr_sizes.items()):
        write_noise(tmp_path / "hr" / f"{name}.png", (48, 48), index)
        write_noise(tmp_path / "sr" / f"{name}.png", (48, 48), index + 10)
        write_noise(tmp_path / "lr" / f"{name}.png", lr_size, index + 20)
    arguments = ["eval", "--hr", str(tmp_path / "hr"), "--sr", str(tmp_path / "sr"), "--lr", str(tmp_path / "lr")]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert "3 LR image(s) are not their HR image shrunk by a whole factor:" in error
    for name in "cde":
        assert f"{name} (hr 48x48, sr 48x48, lr {lr_sizes[name][0]}x{lr_sizes[name][1]})" in error
    assert "a (" not in error and "b (" not in error and "f (" not in error  # x3, x1 (same size) and x2
    for name in "cde":
        (tmp_path / "lr" / f"{name}.png").unlink()
        (tmp_path / "hr" / f"{name}.png").unlink()
        (tmp_path / "sr" / f"{name}.png").unlink()
    assert main(arguments + ["--quiet"]) == 0  # x3, x1 and x2 are fine
    assert "consistency" in capsys.readouterr().out


def test_results_lr_images_of_the_hr_size_are_the_originals_stand_in(tmp_path, capsys):
    # Without an LR input the original saves its bicubic image as <id>_lr.png: no consistency, and no error.
    write_noise(tmp_path / "1_hr.png", (32, 32), 1)
    write_noise(tmp_path / "1_sr.png", (32, 32), 2)
    write_noise(tmp_path / "1_lr.png", (32, 32), 3)
    assert main(["eval", "--results", str(tmp_path)]) == 0
    assert "consistency" not in capsys.readouterr().out


def test_a_mean_over_only_some_images_names_its_count(tmp_path, capsys):
    # Image 1 has only the original's stand-in LR image (the HR size), image 2 a real one: consistency of 2 only.
    for image_id in "12":
        write_noise(tmp_path / "results" / f"{image_id}_hr.png", (32, 32), 1)
        write_noise(tmp_path / "results" / f"{image_id}_sr.png", (32, 32), 2)
    write_noise(tmp_path / "results" / "1_lr.png", (32, 32), 3)
    write_noise(tmp_path / "results" / "2_lr.png", (16, 16), 3)
    report_path = tmp_path / "metrics.json"
    assert main(["eval", "--results", str(tmp_path / "results"), "--json", str(report_path), "--quiet"]) == 0
    assert "(consistency over 1 of 2 images)" in capsys.readouterr().out.splitlines()
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["count"] == 2 and report["counts"] == {"consistency": 1}
    assert set(report["mean"]) == {"psnr", "ssim", "consistency"}
    # Every mean over every image: no counts to name.
    (tmp_path / "results" / "1_lr.png").unlink()
    shutil.copy(tmp_path / "results" / "2_lr.png", tmp_path / "results" / "1_lr.png")
    assert main(["eval", "--results", str(tmp_path / "results"), "--json", str(report_path), "--quiet"]) == 0
    assert " over " not in capsys.readouterr().out
    assert "counts" not in json.loads(report_path.read_text(encoding="utf-8"))


def test_the_json_destination_is_checked_before_any_work(pair_folders, tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("metrics computed before the --json destination was checked")

    monkeypatch.setattr(metrics, "pair_metrics", no_work)
    arguments = ["eval", "--hr", str(pair_folders / "hr"), "--sr", str(pair_folders / "sr"), "--json"]
    folder = tmp_path / "reports"
    folder.mkdir()
    assert main(arguments + [str(folder)]) == 2
    assert f"--json {folder} is a folder" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("a file", encoding="utf-8")
    assert main(arguments + [str(tmp_path / "notes.txt" / "r.json")]) == 2
    assert "notes.txt is a file, not a folder" in capsys.readouterr().err
    assert list(folder.iterdir()) == []


def test_a_failed_json_write_leaves_the_old_report_and_no_temporary_file(pair_folders, tmp_path, monkeypatch, capsys):
    report_path = tmp_path / "reports" / "r.json"
    report_path.parent.mkdir()
    report_path.write_text("the previous report", encoding="utf-8")

    def failing_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", failing_dump)  # inside the write: the temporary file exists by then
    arguments = ["eval", "--hr", str(pair_folders / "hr"), "--sr", str(pair_folders / "sr"), "--quiet", "--json"]
    assert main(arguments + [str(report_path)]) == 2
    assert "disk full" in capsys.readouterr().err
    assert [path.name for path in report_path.parent.iterdir()] == ["r.json"]
    assert report_path.read_text(encoding="utf-8") == "the previous report"


def eval_report(tmp_path, *arguments):
    report_path = tmp_path / "report.json"
    assert main(["eval", *map(str, arguments), "--quiet", "--json", str(report_path)]) == 0
    return json.loads(report_path.read_text(encoding="utf-8"))["images"]


def test_upscale_output_names_match_their_sources(tmp_path, capsys):
    hr, sr = tmp_path / "hr", tmp_path / "sr"
    for index, (hr_name, sr_name) in enumerate(
        [
            ("a.png", "a_sr.png"),
            ("b_hr.png", "b_lr_sr.png"),  # an input named `<name>_lr`
            ("0801.png", "0801x4_sr.png"),  # DIV2K: `0801x4.png` is the x4 input of `0801.png`
            ("box4.png", "box4_sr.png"),  # a name that only looks like DIV2K's keeps its own match
        ]
    ):
        write_noise(hr / hr_name, (16, 16), index)
        write_noise(sr / sr_name, (16, 16), index)
    write_noise(sr / "a_sr_process.png", (48, 16), 9)  # `sr3 upscale --save-process` frames: no SR image
    write_noise(tmp_path / "lr" / "0801x4.png", (4, 4), 10)
    write_noise(tmp_path / "lr" / "a.png", (4, 4), 11)
    write_noise(tmp_path / "lr" / "b_lr.png", (4, 4), 12)
    write_noise(tmp_path / "lr" / "box4.png", (4, 4), 13)
    images = eval_report(tmp_path, "--hr", hr, "--sr", sr, "--lr", tmp_path / "lr")
    assert sorted(images) == ["0801", "a", "b", "box4"]
    assert all(values["psnr"] == "inf" and "consistency" in values for values in images.values())

    # Two SR images that now match one name are refused by name, not paired silently.
    write_noise(sr / "0801_sr.png", (16, 16), 2)
    assert main(["eval", "--hr", str(hr), "--sr", str(sr)]) == 2
    assert (
        f"--sr: {sr / '0801_sr.png'} and {sr / '0801x4_sr.png'} both match the name '0801'" in capsys.readouterr().err
    )
    (sr / "0801_sr.png").unlink()
    write_noise(sr / "b_sr.png", (16, 16), 1)
    assert main(["eval", "--hr", str(hr), "--sr", str(sr)]) == 2
    assert f"{sr / 'b_lr_sr.png'} and {sr / 'b_sr.png'} both match the name 'b'" in capsys.readouterr().err


def test_outputs_inside_the_hr_folder_or_beside_their_sources(tmp_path):
    photos = tmp_path / "photos"
    for index, name in enumerate(["a", "trip/b"]):
        write_noise(photos / f"{name}.png", (16, 16), index)
        write_noise(photos / "upscaled" / f"{name}_sr.png", (16, 16), index)  # `--output photos/upscaled`
    write_noise(photos / "lr" / "a.png", (4, 4), 30)  # an --lr folder inside --hr is left out of it too
    write_noise(photos / "lr" / "trip" / "b.png", (4, 4), 31)
    nested = eval_report(tmp_path, "--hr", photos, "--sr", photos / "upscaled", "--lr", photos / "lr")
    assert sorted(nested) == ["a", "trip/b"] and all(values["psnr"] == "inf" for values in nested.values())

    shutil.rmtree(photos / "upscaled")
    shutil.rmtree(photos / "lr")
    for index, name in enumerate(["a", "trip/b"]):  # `sr3 upscale photos --output photos --save-process`
        write_noise(photos / f"{name}_sr.png", (16, 16), index + 10)
        write_noise(photos / f"{name}_sr_process.png", (48, 16), index + 20)
    beside = eval_report(tmp_path, "--hr", photos, "--sr", photos)
    assert sorted(beside) == ["a", "trip/b"] and all(values["psnr"] != "inf" for values in beside.values())
    # The inputs beside them too (`sr3 upscale photos/a_lr.png --output photos` writes a_lr_sr.png): one folder for
    # all three kinds, each file's last suffix saying which it is.
    for index, name in enumerate(["a", "trip/b"]):
        (photos / f"{name}_sr.png").unlink()
        write_noise(photos / f"{name}_lr.png", (4, 4), index + 30)
        write_noise(photos / f"{name}_lr_sr.png", (16, 16), index)
    shared = eval_report(tmp_path, "--hr", photos, "--sr", photos, "--lr", photos)
    assert sorted(shared) == ["a", "trip/b"] and all(values["psnr"] == "inf" for values in shared.values())
    assert all("consistency" in values for values in shared.values())
    # `sr3 upscale photos --output photos` upscaled the HR images too: scored are the LR inputs' results.
    for index, name in enumerate(["a", "trip/b"]):
        write_noise(photos / f"{name}_sr.png", (64, 64), index + 40)
    assert eval_report(tmp_path, "--hr", photos, "--sr", photos, "--lr", photos) == shared


def test_results_folder_skips_hidden_files_and_refuses_two_files_of_one_id(tmp_path, capsys):
    write_noise(tmp_path / "1_hr.png", (16, 16), 1)
    write_noise(tmp_path / "1_sr.png", (16, 16), 2)
    (tmp_path / "._1_sr.png").write_bytes(b"macOS metadata, no image")
    assert main(["eval", "--results", str(tmp_path), "--quiet"]) == 0
    write_noise(tmp_path / "1_sr.webp", (16, 16), 3)
    assert main(["eval", "--results", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"--results: {tmp_path / '1_sr.png'} and {tmp_path / '1_sr.webp'} both match the name '1_sr'" in error


def test_images_too_small_for_ssim_are_named(tmp_path, capsys):
    write_noise(tmp_path / "hr" / "tiny.png", (8, 8), 1)
    write_noise(tmp_path / "sr" / "tiny.png", (8, 8), 2)
    assert main(["eval", "--hr", str(tmp_path / "hr"), "--sr", str(tmp_path / "sr")]) == 2
    error = capsys.readouterr().err
    sr, hr = tmp_path / "sr" / "tiny.png", tmp_path / "hr" / "tiny.png"
    assert f"{sr} and {hr}: SSIM needs images of at least 11x11 pixels, got 8x8" in error
