"""What the model cards written for the Hub say, and the pictures that go up with them (the loopback Hub of
tests/hub_server.py)."""

import os
import re

import PIL.Image
import pytest
from test_hub import hub  # noqa: F401  (the loopback Hub fixture)

from diffusers_sr3 import pretrained
from diffusers_sr3.model_card import images_shown, is_package_card, write_model_card


def test_only_pictures_inside_the_folder_go_up_with_its_card(tiny_pipeline, hub, tmp_path):  # noqa: F811
    folder = tmp_path / "pimg"
    tiny_pipeline.save_pretrained(folder)
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "pic.png")
    PIL.Image.new("RGB", (8, 8)).save(folder / "val.png")
    os.symlink(tmp_path / "pic.png", folder / "linked.png")  # inside by name, outside in fact
    (folder / "README.md").write_text(
        "# my model\n\n![a](../pic.png) ![b](./val.png) ![c](linked.png)\n", encoding="utf-8"
    )
    assert images_shown(str(folder)) == ["val.png"]
    tiny_pipeline.save_pretrained(folder, push_to_hub=True, repo_id="me/x")
    uploaded = set(hub.repos["me/x"])
    assert "val.png" in uploaded and not {"pic.png", "../pic.png", "linked.png"} & uploaded


def test_a_pushed_pipeline_without_training_facts_is_not_said_to_be_trained_here(tiny_pipeline, hub):  # noqa: F811
    tiny_pipeline.push_to_hub("someone/converted")
    card = hub.repos["someone/converted"]["README.md"].decode()
    assert "trained with diffusers-sr3" not in card and "the data above" not in card
    assert "How it was trained is not recorded here" in card


@pytest.mark.parametrize(
    "description, shown",
    [
        ("/home/me/runs/imgs", "imgs"),
        ("prepared folder /data/faces/", "prepared folder faces"),
        ("LMDB /data/ffhq.lmdb, 3 images", "LMDB ffhq.lmdb, 3 images"),
        ("crops of photos in extra-photos/", "crops of photos in extra-photos/"),
    ],
)
def test_the_training_data_is_named_without_machine_paths(tmp_path, description, shown):
    write_model_card(str(tmp_path), task="sr", upscale_factor=4, resolution=32, data_description=description)
    assert f"Training data: {shown}." in (tmp_path / "README.md").read_text(encoding="utf-8")


def test_the_training_table_names_local_folders_without_machine_paths(tmp_path):
    summary = {"model": "fine-tuned from /home/alice/models/base", "steps": 4}
    write_model_card(str(tmp_path), task="sr", upscale_factor=4, resolution=32, training_summary=summary)
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "| model | fine-tuned from base |" in card and "/home/alice" not in card


def test_a_local_dataset_is_no_hub_dataset_in_the_cards_metadata(tmp_path):
    from diffusers_sr3.training.trainer import _hub_id

    saved = tmp_path / "datasets" / "faces_saved"
    saved.mkdir(parents=True)
    assert _hub_id(str(saved)) is None and _hub_id("/home/alice/faces") is None
    assert _hub_id("someone/faces") == "someone/faces"


def test_the_packaged_models_card_loads_it_from_the_package(tiny_pipeline, tmp_path, monkeypatch):
    folder = tmp_path / "sr3-photos-x4"
    tiny_pipeline.save_pretrained(folder)
    monkeypatch.setattr(pretrained, "default_model_path", lambda: str(folder))
    write_model_card(str(folder), task="sr", upscale_factor=4, resolution=32)
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "from diffusers_sr3.pretrained import default_model_path" in card
    assert "SR3Pipeline.from_pretrained(default_model_path())" in card
    assert "DiffusionPipeline.from_pretrained(default_model_path(), trust_remote_code=True)" in card
    assert 'from_pretrained("sr3-photos-x4"' not in card


def test_pushing_a_saved_folder_again_keeps_the_card_edited_on_the_hub(tiny_pipeline, hub, tmp_path):  # noqa: F811
    folder = tmp_path / "model"
    tiny_pipeline.save_pretrained(folder)
    write_model_card(str(folder), task="sr", upscale_factor=4, resolution=32, metrics={"psnr": 20.0})
    tiny_pipeline.save_pretrained(folder, push_to_hub=True, repo_id="me/edited")
    assert is_package_card(hub.repos["me/edited"]["README.md"].decode())
    edited = hub.repos["me/edited"]["README.md"].decode().replace("# SR3", "# My SR3 for faces", 1)
    hub.repos["me/edited"]["README.md"] = edited.encode()
    assert not is_package_card(edited)
    write_model_card(str(folder), task="sr", upscale_factor=4, resolution=32, metrics={"psnr": 21.0})
    tiny_pipeline.save_pretrained(folder, push_to_hub=True, repo_id="me/edited", commit_message="new weights")
    assert hub.repos["me/edited"]["README.md"].decode() == edited
    assert hub.commits[-1]["paths"] and "README.md" not in hub.commits[-1]["paths"]  # the weights went up


def test_a_metric_that_is_not_a_number_stays_out_of_the_model_index(tmp_path):
    # A diverged run's validation (NaN), or PSNR of an exact match (inf): JSON, which the Hub serves metadata as, has
    # no such numbers, and a model-index result must be a number.
    import json

    import yaml

    metrics = {"psnr": float("inf"), "ssim": float("nan"), "consistency": 2e-4}
    write_model_card(str(tmp_path), task="sr", upscale_factor=4, resolution=32, metrics=metrics)
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    results = yaml.safe_load(card.split("---")[1])["model-index"][0]["results"]
    json.dumps(results, allow_nan=False)
    assert [metric["type"] for metric in results[0]["metrics"]] == ["consistency"]
    assert "| PSNR (dB) | inf |" in card  # the table still shows what the run measured


def test_a_card_the_user_wrote_in_the_folder_goes_up_at_every_push(tiny_pipeline, hub, tmp_path):  # noqa: F811
    from diffusers_sr3.training.hub import push_folder

    folder = tmp_path / "own"
    tiny_pipeline.save_pretrained(folder)
    (folder / "README.md").write_text("# My model\n\nversion 1\n", encoding="utf-8")
    tiny_pipeline.save_pretrained(folder, push_to_hub=True, repo_id="me/own")
    (folder / "README.md").write_text("# My model\n\nversion 2 (typo fixed)\n", encoding="utf-8")
    tiny_pipeline.save_pretrained(folder, push_to_hub=True, repo_id="me/own")
    assert hub.repos["me/own"]["README.md"].decode() == "# My model\n\nversion 2 (typo fixed)\n"
    (folder / "README.md").write_text("# My model\n\nversion 3\n", encoding="utf-8")
    push_folder(str(folder), "me/own")
    assert hub.repos["me/own"]["README.md"].decode() == "# My model\n\nversion 3\n"


def test_a_card_without_the_stamp_is_kept_with_a_warning_saying_how_to_replace_it(
    tiny_pipeline,
    hub,  # noqa: F811
    tmp_path,
    caplog,
):
    from diffusers_sr3.model_card import _STAMP
    from diffusers_sr3.training.hub import push_folder

    folder = tmp_path / "run"
    tiny_pipeline.save_pretrained(folder)
    write_model_card(str(folder), task="sr", upscale_factor=4, resolution=32, repo_id="me/run", metrics={"psnr": 20})
    # The card an earlier diffusers-sr3 pushed: the same, without the stamp.
    old = _STAMP.sub("", (folder / "README.md").read_text(encoding="utf-8")).rstrip() + "\n"
    hub.repos["me/run"] = {"README.md": old.encode()}
    write_model_card(str(folder), task="sr", upscale_factor=4, resolution=32, repo_id="me/run", metrics={"psnr": 25})
    command = "`python -c 'from diffusers_sr3.training.hub import push_model_card; "
    command += f'push_model_card("{folder}", "me/run")\'`'
    for push in (
        lambda: push_folder(str(folder), "me/run"),
        lambda: tiny_pipeline.save_pretrained(folder, push_to_hub=True, repo_id="me/run"),
    ):
        caplog.clear()
        push()
        assert hub.repos["me/run"]["README.md"].decode() == old
        assert "unet/diffusion_pytorch_model.safetensors" in hub.repos["me/run"]  # the rest went up
        warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
        assert len(warnings) == 1 and "or pushed by an earlier diffusers-sr3" in warnings[0], warnings
        assert command in warnings[0]


def run_suggested_command(warning):
    """Run the command a warning suggests (`python -c '...'`) as a shell would, in this process (the loopback Hub)."""
    import shlex

    program, option, code = shlex.split(warning.split("run `", 1)[1].rsplit("`", 1)[0])
    assert (program, option) == ("python", "-c")
    exec(code, {})


def test_the_suggested_replacement_uploads_the_card_naming_the_repo_and_its_pictures(
    tiny_pipeline,
    hub,  # noqa: F811
    tmp_path,
    caplog,
):
    """A training-style card (naming the folder, showing a sample) withheld by `save_pretrained`'s push: the warning's
    command, run as it says, puts the card up naming the repo, with the sample, over the hand-written one, in one
    commit of those two files only (not the folder's other files, which the push did not upload either)."""
    folder = tmp_path / "run"
    tiny_pipeline.save_pretrained(folder)
    PIL.Image.new("RGB", (8, 8)).save(folder / "sample.png")
    (folder / "private_notes.txt").write_text("not for the Hub\n", encoding="utf-8")
    write_model_card(str(folder), task="sr", upscale_factor=4, resolution=32, sample_image="sample.png")
    hub.repos["me/run"] = {"README.md": b"# My words\n"}
    tiny_pipeline.save_pretrained(folder, push_to_hub=True, repo_id="me/run")
    assert hub.repos["me/run"]["README.md"] == b"# My words\n" and "sample.png" not in hub.repos["me/run"]
    run_suggested_command(next(record.getMessage() for record in caplog.records if record.levelname == "WARNING"))
    card = hub.repos["me/run"]["README.md"].decode()
    assert 'from_pretrained("me/run")' in card and 'from_pretrained("run")' not in card
    assert hub.repos["me/run"]["sample.png"] == (folder / "sample.png").read_bytes()
    assert is_package_card(card)  # the package's own again: a later push replaces it
    assert hub.commits[-1]["paths"] == ["README.md", "sample.png"] and not hub.commits[-1]["create_pr"]
    assert "private_notes.txt" not in hub.repos["me/run"]


def test_the_suggested_replacement_of_a_push_opening_a_pull_request_opens_one_too(
    tiny_pipeline,
    hub,  # noqa: F811
    tmp_path,
    caplog,
):
    from diffusers_sr3.training.hub import HubUploadError, push_model_card

    folder = tmp_path / "run"
    tiny_pipeline.save_pretrained(folder)
    write_model_card(str(folder), task="sr", upscale_factor=4, resolution=32, repo_id="me/pr")
    hub.repos["me/pr"] = {"README.md": b"# My words\n"}
    tiny_pipeline.save_pretrained(folder, push_to_hub=True, repo_id="me/pr", create_pr=True)
    assert hub.commits[-1]["create_pr"] and "README.md" not in hub.commits[-1]["paths"]
    warning = next(record.getMessage() for record in caplog.records if record.levelname == "WARNING")
    assert f'push_model_card("{folder}", "me/pr", create_pr=True)' in warning
    run_suggested_command(warning)
    assert hub.commits[-1]["paths"] == ["README.md"] and hub.commits[-1]["create_pr"]
    assert hub.repos["me/pr"]["README.md"] == (folder / "README.md").read_bytes()  # named the repo already
    hub.fail_commits = 403
    retry = "retry with `python -c 'from diffusers_sr3.training.hub import push_model_card; "
    retry += f'push_model_card("{folder}", "me/pr", create_pr=True)\'`'
    with pytest.raises(HubUploadError, match=re.escape(retry) + "$"):
        push_model_card(str(folder), "me/pr", create_pr=True)
    hub.fail_commits = None
    (folder / "README.md").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no model card \(README.md\) to upload$"):
        push_model_card(str(folder), "me/pr")


def test_a_hub_card_that_is_not_utf8_is_kept_and_no_push_fails(tiny_pipeline, hub, tmp_path):  # noqa: F811
    from diffusers_sr3.training.hub import push_folder

    notepad = "# Modèle SR3\n".encode("utf-16")
    hub.repos["me/utf16"] = {"README.md": notepad}
    tiny_pipeline.push_to_hub("me/utf16")
    folder = tmp_path / "run"
    tiny_pipeline.save_pretrained(folder)
    write_model_card(str(folder), task="sr", upscale_factor=4, resolution=32, repo_id="me/utf16")
    push_folder(str(folder), "me/utf16")
    tiny_pipeline.save_pretrained(folder, push_to_hub=True, repo_id="me/utf16")
    assert hub.repos["me/utf16"]["README.md"] == notepad
    assert "unet/diffusion_pytorch_model.safetensors" in hub.repos["me/utf16"]
