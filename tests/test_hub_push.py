"""What `push_folder` leaves out of a training run's upload, and the retry it suggests when the upload fails (the
loopback Hub of tests/hub_server.py)."""

import shlex

import pytest
from hub_server import LOOPBACK_USER
from test_hub import hub  # noqa: F401  (the loopback Hub fixture)

from diffusers_sr3.model_card import write_model_card
from diffusers_sr3.training.hub import HubUploadError, push_folder


def training_run(tiny_pipeline, folder):
    """A run's folder: the pipeline, checkpoints and TensorBoard logs in `tb` (`--logging_dir tb`)."""
    tiny_pipeline.save_pretrained(folder)
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "optimizer.bin").write_bytes(b"state")
    (folder / "tb" / "sr3" / "1").mkdir(parents=True)
    (folder / "tb" / "sr3" / "events.out.tfevents.1.host").write_bytes(b"events")
    (folder / "tb" / "sr3" / "1" / "hparams.yml").write_text(f"output_dir: {folder}\n", encoding="utf-8")
    return folder


def test_a_custom_logging_dir_is_never_uploaded(tiny_pipeline, hub, tmp_path):  # noqa: F811
    run = training_run(tiny_pipeline, tmp_path / "run")
    push_folder(str(run), "someone/plain", logging_dir="tb")  # no card: upload_folder
    write_model_card(str(run), task="sr", upscale_factor=4, resolution=32)
    push_folder(str(run), "someone/carded", logging_dir=str(run / "tb"))  # a card: one commit, absolute folder
    for repo in ("someone/plain", "someone/carded"):
        uploaded = set(hub.repos[repo])
        assert "unet/diffusion_pytorch_model.safetensors" in uploaded
        assert not [path for path in uploaded if path.startswith(("tb/", "checkpoint-"))], uploaded
    assert "README.md" in hub.repos["someone/carded"]


def test_a_logging_dir_whose_name_looks_like_a_pattern_is_left_out_by_name(tiny_pipeline, hub, tmp_path):  # noqa: F811
    run = training_run(tiny_pipeline, tmp_path / "run")
    (run / "tb").rename(run / "runs[1]")
    (run / "runs1").mkdir()
    (run / "runs1" / "notes.txt").write_text("kept: `runs[1]` is a name, not the pattern runs1", encoding="utf-8")
    push_folder(str(run), "someone/brackets", logging_dir="runs[1]")
    uploaded = set(hub.repos["someone/brackets"])
    assert not [path for path in uploaded if path.startswith("runs[1]/")] and "runs1/notes.txt" in uploaded


def test_the_suggested_retry_uploads_a_card_naming_the_repo(tiny_pipeline, hub, tmp_path):  # noqa: F811
    run = training_run(tiny_pipeline, tmp_path / "run2")
    write_model_card(str(run), task="sr", upscale_factor=4, resolution=32)
    hub.fail_commits = 403
    with pytest.raises(HubUploadError, match="saved and intact") as raised:
        push_folder(str(run), logging_dir="tb")  # no repo id: the token's namespace, under the folder's name
    retry = str(raised.value).split("retry with `", 1)[1].rsplit("`", 1)[0]
    assert "hf upload" not in retry
    program, option, code = shlex.split(retry)
    assert (program, option) == ("python", "-c")
    hub.fail_commits = None
    exec(code, {})
    uploaded = hub.repos[f"{LOOPBACK_USER}/run2"]
    assert f'SR3Pipeline.from_pretrained("{LOOPBACK_USER}/run2")' in uploaded["README.md"].decode()
    assert not [path for path in uploaded if path.startswith(("tb/", "checkpoint-"))]


def test_a_second_training_push_keeps_the_card_the_user_edited_on_the_hub(tiny_pipeline, hub, tmp_path):  # noqa: F811
    run = training_run(tiny_pipeline, tmp_path / "run3")
    write_model_card(str(run), task="sr", upscale_factor=4, resolution=32, metrics={"psnr": 20.0})
    push_folder(str(run), "someone/edited", logging_dir="tb")
    first = hub.repos["someone/edited"]["README.md"].decode()
    edited = first.replace("## How to use", "## Notes\n\nMy own words about this model.\n\n## How to use")
    hub.repos["someone/edited"]["README.md"] = edited.encode()
    write_model_card(str(run), task="sr", upscale_factor=4, resolution=32, metrics={"psnr": 21.0})
    push_folder(str(run), "someone/edited", logging_dir="tb")
    assert hub.repos["someone/edited"]["README.md"].decode() == edited
    # An unedited card of an earlier push is the package's own: the new run's card replaces it.
    push_folder(str(run), "someone/fresh", logging_dir="tb")
    write_model_card(str(run), task="sr", upscale_factor=4, resolution=32, metrics={"psnr": 22.0})
    push_folder(str(run), "someone/fresh", logging_dir="tb")
    assert "22.00" in hub.repos["someone/fresh"]["README.md"].decode()


def test_replace_card_puts_the_runs_card_over_a_hand_written_one_and_the_warning_says_so(
    tiny_pipeline,
    hub,  # noqa: F811
    tmp_path,
    caplog,
):
    run = training_run(tiny_pipeline, tmp_path / "run4")
    write_model_card(str(run), task="sr", upscale_factor=4, resolution=32)
    hub.repos["someone/own"] = {"README.md": b"# Mine\n"}
    push_folder(str(run), "someone/own", logging_dir="tb")
    assert hub.repos["someone/own"]["README.md"] == b"# Mine\n"
    warning = next(record.getMessage() for record in caplog.records if record.levelname == "WARNING")
    program, option, code = shlex.split(warning.split("run `", 1)[1].rsplit("`", 1)[0])
    assert code.endswith(f'push_model_card("{run}", "someone/own")')
    exec(code, {})
    uploaded = hub.repos["someone/own"]
    assert 'SR3Pipeline.from_pretrained("someone/own")' in uploaded["README.md"].decode()
    assert hub.commits[-1]["paths"] == ["README.md"]  # the push had uploaded the rest
    uploaded["README.md"] = b"# Mine\n"
    push_folder(str(run), "someone/own", logging_dir="tb", replace_card=True)
    assert 'SR3Pipeline.from_pretrained("someone/own")' in uploaded["README.md"].decode()
    assert not [path for path in uploaded if path.startswith(("tb/", "checkpoint-"))]


@pytest.mark.parametrize("with_card", [False, True], ids=["upload_folder", "one-commit"])
def test_a_run_without_lora_removes_an_earlier_runs_adapter_from_the_repo(tiny_pipeline, hub, tmp_path, with_card):  # noqa: F811
    """A --lora_rank run pushed its adapter beside the pipeline; a later full run pushed to the same repo (whose
    trainer removed the adapter locally) must not leave it there, describing another model. A file the repo's
    owner added stays."""
    run = training_run(tiny_pipeline, tmp_path / "run")
    if with_card:
        write_model_card(str(run), task="sr", upscale_factor=4, resolution=32)
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"an adapter")
    push_folder(str(run), "someone/reused", logging_dir="tb")
    hub.repos["someone/reused"]["notes.txt"] = b"added on the Hub"
    assert "pytorch_lora_weights.safetensors" in hub.repos["someone/reused"]

    (run / "pytorch_lora_weights.safetensors").unlink()
    push_folder(str(run), "someone/reused", logging_dir="tb")
    repo = hub.repos["someone/reused"]
    assert "pytorch_lora_weights.safetensors" not in repo
    assert {"notes.txt", "unet/diffusion_pytorch_model.safetensors", "model_index.json"} <= set(repo)
    # In the upload's own commit: the repo never holds the new model beside the old adapter.
    assert hub.commits[-1]["deleted"] == ["pytorch_lora_weights.safetensors"] and hub.commits[-1]["paths"]
    assert len(hub.commits) == 2


def test_a_push_removes_the_weights_and_components_of_the_repos_earlier_save(
    tiny_pipeline,
    guided_pipeline,
    hub,  # noqa: F811
    tmp_path,
):
    """Shards left beside new single-file weights are what Diffusers loads (it reads a shard index first); a removed
    component's folder is downloaded by every load. A variant pushed after the main weights keeps them, as a local
    save does."""
    import torch

    from diffusers_sr3 import SR3Pipeline

    guided_pipeline.save_pretrained(tmp_path / "guided", max_shard_size="50KB", push_to_hub=True, repo_id="someone/re")
    before = set(hub.repos["someone/re"])
    assert "unet/diffusion_pytorch_model.safetensors.index.json" in before and "guidance_unet/config.json" in before

    tiny_pipeline.push_to_hub("someone/re")
    tiny_pipeline.push_to_hub("someone/re", variant="fp16")
    repo = sorted(hub.repos["someone/re"])
    assert not [path for path in repo if path.startswith("guidance_unet/")], repo
    weights = [path for path in repo if path.startswith("unet/diffusion_pytorch_model")]
    assert weights == ["unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors"]
    loaded = SR3Pipeline.from_pretrained("someone/re")
    assert loaded.guidance_unet is None
    torch.testing.assert_close(loaded.unet.conv_in.weight, tiny_pipeline.unet.conv_in.weight)


@pytest.mark.parametrize("damaged", [b"{not json", b"[1, 2]", b"\xff\xfe"], ids=["not-json", "not-object", "not-utf8"])
def test_a_push_replaces_a_damaged_model_index_and_deletes_no_folder_on_its_word(
    tiny_pipeline,
    guided_pipeline,
    hub,  # noqa: F811
    tmp_path,
    damaged,
):
    """A push is how a damaged repo gets repaired: its earlier model_index.json, unreadable, names no component folder
    to delete (the earlier guide stays) and fails no push; the pushed save replaces it."""
    from diffusers_sr3 import SR3Pipeline

    guided_pipeline.push_to_hub("someone/damaged")
    hub.repos["someone/damaged"]["model_index.json"] = damaged
    tiny_pipeline.push_to_hub("someone/damaged")
    assert "guidance_unet/config.json" in hub.repos["someone/damaged"]
    assert SR3Pipeline.from_pretrained("someone/damaged").guidance_unet is None

    run = training_run(tiny_pipeline, tmp_path / "run")
    hub.repos["someone/damaged"]["model_index.json"] = damaged
    push_folder(str(run), "someone/damaged", logging_dir="tb")
    assert hub.repos["someone/damaged"]["model_index.json"] == (run / "model_index.json").read_bytes()


def test_a_cascade_push_removes_a_stages_earlier_guide(hub):  # noqa: F811
    """A cascade stage's own model_index.json names its components: a guide it no longer has leaves the repo too,
    and is no longer fetched by every load of the cascade."""
    from test_cascade import unet

    from diffusers_sr3 import SR3CascadePipeline, SR3Pipeline, SR3UnconditionalPipeline, make_scheduler

    def cascade(guided):
        guide = dict(guidance_unet=unet(6, 32), guidance_scale=2.0) if guided else {}
        stage = SR3Pipeline(unet(6, 32), make_scheduler("ddim", n_timestep=50), upscale_factor=4, **guide)
        base = SR3UnconditionalPipeline(unet(3, 8), make_scheduler("ddim", n_timestep=50))
        return SR3CascadePipeline.from_stages(base, [stage])

    cascade(guided=True).push_to_hub("someone/cascade")
    hub.repos["someone/cascade"]["samples/face.png"] = b"a sample"
    assert "stage_1/guidance_unet/diffusion_pytorch_model.safetensors" in hub.repos["someone/cascade"]

    cascade(guided=False).push_to_hub("someone/cascade")
    repo = set(hub.repos["someone/cascade"])
    assert not [path for path in repo if path.startswith("stage_1/guidance_unet/")], sorted(repo)
    assert {"samples/face.png", "stage_1/unet/diffusion_pytorch_model.safetensors", "base/model_index.json"} <= repo
    fetched_from = len(hub.requests)
    assert SR3CascadePipeline.from_pretrained("someone/cascade").stage_1.guidance_unet is None
    assert not [request for request in hub.requests[fetched_from:] if "guidance_unet" in request]
