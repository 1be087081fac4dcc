"""Hub upload and download against a loopback Hub (tests/hub_server.py): no network leaves the machine."""

import json
import os
import time

import PIL.Image
import pytest
import torch
from hub_server import HubServer
from test_data import make_image_folder
from test_training import SR_SCRIPT, as_argv, fast_options, run_script

from diffusers_sr3 import SR3Pipeline
from diffusers_sr3.training.hub import HubUploadError, push_folder


@pytest.fixture
def hub(monkeypatch):
    """A running loopback Hub that huggingface_hub (and the diffusers loaders) talk to instead of the real one."""
    from huggingface_hub import constants, hf_api

    with HubServer() as server:
        # huggingface_hub reads these at import time (tests import it with HF_HUB_OFFLINE=1): patch the values.
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_api.api, "endpoint", server.url)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_TOKEN", "hf_loopback_token")
        yield server


def sample(pipeline, seed=0):
    generator = torch.Generator().manual_seed(seed)
    low = torch.linspace(0, 1, 3 * 8 * 8).reshape(1, 3, 8, 8)
    return pipeline(low, num_inference_steps=3, generator=generator, output_type="pt").images


def test_push_and_load_back_with_both_loaders(tiny_pipeline, hub, tmp_path):
    from diffusers import DiffusionPipeline

    folder = tmp_path / "saved"
    tiny_pipeline.save_pretrained(folder)
    commit_url = push_folder(str(folder), "someone/sr3-tiny", token="hf_loopback_token")
    assert commit_url.startswith(hub.url + "/someone/sr3-tiny/commit/")
    assert {"model_index.json", "pipeline_sr3.py", "unet/unet_sr3.py"} <= set(hub.repos["someone/sr3-tiny"])

    expected = sample(tiny_pipeline)
    safe = SR3Pipeline.from_pretrained("someone/sr3-tiny")
    torch.testing.assert_close(sample(safe), expected)
    remote_code = DiffusionPipeline.from_pretrained("someone/sr3-tiny", trust_remote_code=True)
    assert type(remote_code).__name__ == "SR3Pipeline"
    remote_code.set_progress_bar_config(disable=True)
    torch.testing.assert_close(sample(remote_code), expected)


def test_pipelines_push_their_files_and_an_sr3_card(tiny_pipeline, hub, tmp_path):
    # save_pretrained(push_to_hub=True): the files just saved, never the folder's others, and an SR3 card.
    target = tmp_path / "out"
    (target / "checkpoint-1").mkdir(parents=True)
    (target / "checkpoint-1" / "optimizer.bin").write_bytes(b"state")
    (target / "notes.txt").write_text("mine", encoding="utf-8")
    tiny_pipeline.save_pretrained(target, push_to_hub=True, repo_id="someone/sr3", variant="fp16")
    uploaded = hub.repos["someone/sr3"]
    assert {"model_index.json", "pipeline_sr3.py", "unet/unet_sr3.py", "README.md"} <= set(uploaded)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in uploaded
    assert not [name for name in uploaded if name.startswith("checkpoint-") or name == "notes.txt"]
    card = uploaded["README.md"].decode()
    # Not Diffusers' empty template: what the model is and how to load it.
    assert "# SR3 x4 super-resolution" in card and 'SR3Pipeline.from_pretrained("someone/sr3")' in card
    assert "More Information Needed" not in card
    assert (target / "README.md").read_text(encoding="utf-8") == card  # written into the folder too, as Diffusers does

    # A folder with its own card (here a trained model's, with its picture): that card and picture go up.
    trained = tmp_path / "trained"
    tiny_pipeline.save_pretrained(trained)
    PIL.Image.new("RGB", (8, 8)).save(trained / "validation.png")
    (trained / "unused.png").write_bytes(b"not shown")
    own_card = "---\nlicense: mit\n---\n# My SR3\n\n![grid](validation.png)\n"
    (trained / "README.md").write_text(own_card, encoding="utf-8")
    SR3Pipeline.from_pretrained(trained).save_pretrained(trained, push_to_hub=True, repo_id="someone/trained")
    uploaded = hub.repos["someone/trained"]
    assert uploaded["README.md"].decode() == own_card
    assert "validation.png" in uploaded and "unused.png" not in uploaded

    # push_to_hub(): the same layout; a repo that has a card keeps it.
    tiny_pipeline.push_to_hub("someone/trained", commit_message="new weights")
    assert hub.repos["someone/trained"]["README.md"].decode() == own_card
    commit = tiny_pipeline.push_to_hub("someone/fresh")
    assert commit.startswith(hub.url + "/someone/fresh/commit/") and commit.commit_url == commit  # a CommitInfo
    # Into a subfolder, as Diffusers' push_to_hub takes it: the pipeline there, no card of its own.
    tiny_pipeline.push_to_hub("someone/models", subfolder="x4")
    uploaded = hub.repos["someone/models"]
    assert {"x4/model_index.json", "x4/unet/diffusion_pytorch_model.safetensors"} <= set(uploaded)
    assert not [name for name in uploaded if name.endswith("README.md")]
    assert "# SR3 x4 super-resolution" in hub.repos["someone/fresh"]["README.md"].decode()
    assert SR3Pipeline.from_pretrained("someone/fresh").config.upscale_factor == 4


def test_training_script_pushes_the_pipeline_but_never_checkpoints(hub, tmp_path, monkeypatch):
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    output = tmp_path / "out"
    options = fast_options(
        output,
        train_data_dir=data,
        checkpointing_steps=1,
        report_to="tensorboard",
        # Not the default "logs": the trainer tells the upload which folder its logs are in, here the tracker
        # project's folder beside the pipeline's.
        logging_dir=".",
        push_to_hub=True,
        hub_model_id="someone/trained-sr3",
    )
    assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 0, hub.requests
    assert len(os.listdir(output / "checkpoint-4")) > 0 and (output / "sr3").is_dir()
    uploaded = [path for commit in hub.commits for path in commit["paths"]]
    assert "README.md" in uploaded and "unet/diffusion_pytorch_model.safetensors" in uploaded
    assert not [path for path in uploaded if path.startswith(("checkpoint-", ".tmp", "sr3/"))]
    card = hub.repos["someone/trained-sr3"]["README.md"].decode()
    assert 'SR3Pipeline.from_pretrained("someone/trained-sr3")' in card
    torch.testing.assert_close(
        sample(SR3Pipeline.from_pretrained("someone/trained-sr3")), sample(SR3Pipeline.from_pretrained(str(output)))
    )


def test_a_run_pushed_without_a_repo_id_names_its_repo_in_the_card(hub, tmp_path, monkeypatch):
    # As Diffusers' training examples: --push_to_hub alone pushes to the user's namespace, under the folder's name.
    from hub_server import LOOPBACK_USER

    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    output = tmp_path / "faces-run"
    options = fast_options(output, train_data_dir=data, checkpointing_steps=2, push_to_hub=True)
    assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 0, hub.requests
    repo_id = f"{LOOPBACK_USER}/faces-run"
    uploaded = hub.repos[repo_id]
    card = uploaded["README.md"].decode()
    assert f'SR3Pipeline.from_pretrained("{repo_id}")' in card and 'from_pretrained("faces-run"' not in card
    assert "unet/diffusion_pytorch_model.safetensors" in uploaded
    assert not [path for path in uploaded if path.startswith(("checkpoint-", ".tmp", "logs/"))]
    assert 'from_pretrained("faces-run"' in (output / "README.md").read_text(
        encoding="utf-8"
    )  # the local card is untouched
    SR3Pipeline.from_pretrained(repo_id)


def test_failed_upload_keeps_the_local_save_and_says_why(hub, tmp_path, monkeypatch, capsys):
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    output = tmp_path / "out"
    hub.fail_commits = 403  # e.g. a token without write access (not retried, unlike 5xx answers)
    options = fast_options(output, train_data_dir=data, push_to_hub=True, hub_model_id="someone/failing")
    assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 1
    error = capsys.readouterr().err
    assert "upload to" in error and "someone/failing failed" in error and "403" in error
    assert f"saved and intact in {output}" in error
    summary = json.loads((output / "training_summary.json").read_text(encoding="utf-8"))
    assert summary["global_step"] == 4
    assert SR3Pipeline.from_pretrained(str(output)).config.upscale_factor == 4
    assert hub.repos["someone/failing"] == {}

    # A Hub that is down (nothing listens on the port): the same clear error, quickly.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    started = time.time()
    with pytest.raises(HubUploadError, match=r"failed \(.*Connect.*\).*saved and intact"):
        push_folder(str(output), "someone/failing")
    assert time.time() - started < 30


@pytest.mark.slow
def test_server_error_after_retries_is_reported(hub, tmp_path):
    """A Hub answering 500: huggingface_hub retries with back-off (~25 s), then the error names the status."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    (folder / "checkpoint-1").mkdir()
    (folder / "checkpoint-1" / "optimizer.bin").write_bytes(b"state")
    hub.fail_commits = 500
    with pytest.raises(HubUploadError, match=r"500 Internal Server Error.*saved and intact"):
        push_folder(str(folder), "someone/flaky")
    assert (folder / "config.json").read_text(encoding="utf-8") == "{}" and (
        folder / "checkpoint-1" / "optimizer.bin"
    ).exists()
    hub.fail_commits = None
    push_folder(str(folder), "someone/flaky")
    assert set(hub.repos["someone/flaky"]) == {"config.json"}


def test_no_token_is_written_logged_or_uploaded(hub, tmp_path, monkeypatch, capsys, caplog):
    """A real run with --hub_token and HF_TOKEN: no file, console line, log record or upload holds either token."""
    import logging

    option_token = "hf_" + "OptionTokenX7" * 3  # shaped like a Hub token
    environment_token = "env-secret-0123456789"  # not shaped like one: only its value identifies it
    monkeypatch.setenv("HF_TOKEN", environment_token)
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    output = tmp_path / "out"
    options = fast_options(
        output,
        train_data_dir=data,
        checkpointing_steps=2,
        validation_steps=2,
        report_to="tensorboard",
        push_to_hub=True,
        hub_model_id="someone/secret-sr3",
        hub_token=option_token,
    )
    caplog.set_level(logging.INFO)
    assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 0, hub.requests
    secrets = [option_token.encode(), environment_token.encode()]

    written = [path for path in output.rglob("*") if path.is_file()]
    assert any(path.name.startswith("events.out.tfevents") for path in written)  # tracker hparams included
    assert any("checkpoint-" in str(path) for path in written)
    for path in written:
        content = path.read_bytes()
        assert not any(secret in content for secret in secrets), f"a token was written to {path}"
    captured = capsys.readouterr()
    console = (captured.out + captured.err + caplog.text).encode()
    assert not any(secret in console for secret in secrets), "a token reached the console or the logs"
    uploaded = hub.repos["someone/secret-sr3"]
    assert "README.md" in uploaded and "training_summary.json" in uploaded
    for path, content in uploaded.items():
        assert not any(secret in content for secret in secrets), f"a token was uploaded in {path}"
    # The card still says how the model was trained, with the token's place marked.
    card = uploaded["README.md"].decode()
    assert "--hub_token '<redacted>'" in card and "--max_train_steps 4" in card


def test_a_trained_folder_pushed_later_names_its_repo_in_the_uploaded_card(tiny_pipeline, hub, tmp_path):
    """A card written at training time names the output folder ("run"); pushed from that folder, the uploaded copy
    names the repo (metadata and loading examples), and the local card stays as it was."""
    import yaml

    from diffusers_sr3.model_card import is_package_card, write_model_card

    run = tmp_path / "run"
    tiny_pipeline.save_pretrained(run)
    write_model_card(
        str(run),
        task="sr",
        upscale_factor=4,
        resolution=32,
        metrics={"psnr": 30.0},
        training_command="accelerate launch examples/train_sr3.py --output_dir run",
    )
    local = (run / "README.md").read_text(encoding="utf-8")
    assert 'SR3Pipeline.from_pretrained("run")' in local
    SR3Pipeline.from_pretrained(run).save_pretrained(run, push_to_hub=True, repo_id="alice/sr3-faces")
    card = hub.repos["alice/sr3-faces"]["README.md"].decode()
    assert yaml.safe_load(card.split("---")[1])["model-index"][0]["name"] == "alice/sr3-faces"
    assert 'SR3Pipeline.from_pretrained("alice/sr3-faces")' in card
    assert 'DiffusionPipeline.from_pretrained("alice/sr3-faces", trust_remote_code=True)' in card
    assert 'from_pretrained("run"' not in card and "--output_dir run" in card  # the command is left as it ran
    # The same card otherwise, stamped anew as the package's own (a later push may replace it).
    assert card.replace("alice/sr3-faces", "run").rsplit("<!--", 1)[0] == local.rsplit("<!--", 1)[0]
    assert is_package_card(card)
    assert (run / "README.md").read_text(encoding="utf-8") == local

    # A card without results names the model in `model_name`: the same.
    plain = tmp_path / "plain"
    tiny_pipeline.save_pretrained(plain)
    write_model_card(str(plain), task="sr", upscale_factor=4, resolution=32)
    SR3Pipeline.from_pretrained(plain).save_pretrained(plain, push_to_hub=True, repo_id="alice/plain-sr3")
    card = hub.repos["alice/plain-sr3"]["README.md"].decode()
    assert yaml.safe_load(card.split("---")[1])["model_name"] == "alice/plain-sr3"
    assert 'from_pretrained("alice/plain-sr3"' in card and 'from_pretrained("plain"' not in card
