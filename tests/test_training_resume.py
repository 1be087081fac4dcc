"""Resumable training: N steps == N/2 steps + stop + resume + N/2 steps; interrupted checkpoints never count."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_data import make_image_folder
from test_training import fast_options

from diffusers_sr3.training import Trainer, TrainingConfig, train
from diffusers_sr3.training.checkpointing import (
    STATE_FILE,
    UNET_CONFIG_FILE,
    check_random_states,
    check_same_objective,
    finish_checkpoint,
    list_checkpoints,
    load_checkpoint_extras,
    load_checkpoint_unet,
    resolve_checkpoint,
    temporary_checkpoint_dir,
)


def resume_options(tmp_path, output, **overrides):
    # 6 images, batch 2 -> 3 steps per epoch: 8 steps cross two epoch boundaries and the stop (step 4) lies
    # inside an epoch, so the data order, augmentation draws and the skip-ahead on resume are all exercised.
    data = os.path.join(str(tmp_path), "images")
    if not os.path.isdir(data):
        make_image_folder(data, count=6, size=(48, 48), bad=False)
    options = fast_options(
        output,
        train_data_dir=data,
        max_train_steps=8,
        checkpointing_steps=4,
        use_ema=True,
        ema_decay=0.9,
        lr_scheduler="cosine",
        lr_warmup_steps=3,
        random_crop=True,
        lr_blur_sigma=1.0,
    )
    options.update(overrides)
    return TrainingConfig(**options)


def weights(folder, name="model.safetensors"):
    return load_file(os.path.join(folder, name))


def assert_same(first, second):
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-6, msg=key)


def stop_after_first_checkpoint(config):
    """Run `config` until it has written its first checkpoint, then stop as a killed job would."""

    class Stop(Exception):
        pass

    trainer = Trainer(config)
    save = trainer._save_checkpoint

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise Stop()

    trainer._save_checkpoint = save_then_stop
    with pytest.raises(Stop):
        trainer.run()


def stop_and_resume(tmp_path, output_dir, **options):
    """Run until the first checkpoint, stop, then resume from `latest` to the end: the resumed run's trainer."""
    stop_after_first_checkpoint(resume_options(tmp_path, output_dir, **options))
    trainer = Trainer(resume_options(tmp_path, output_dir, resume_from_checkpoint="latest", **options))
    trainer.run()
    return trainer


def test_resume_gives_the_same_weights(tmp_path):
    straight = tmp_path / "straight"
    uninterrupted = Trainer(resume_options(tmp_path, straight))
    uninterrupted.run()

    resumed = tmp_path / "resumed"
    stop_after_first_checkpoint(resume_options(tmp_path, resumed))
    assert [os.path.basename(path) for path in list_checkpoints(str(resumed))] == ["checkpoint-4"]
    assert not (resumed / "model_index.json").exists()

    rerun = Trainer(resume_options(tmp_path, resumed, resume_from_checkpoint="latest"))
    rerun.run()
    assert rerun.summary["resumed_from"].endswith("checkpoint-4") and rerun.summary["steps_this_run"] == 4
    # Before, the resumed run's final loss averaged only its own 4 steps, not all 8 as the straight run's does.
    summaries = [
        json.loads((folder / "training_summary.json").read_text(encoding="utf-8")) for folder in (straight, resumed)
    ]
    assert summaries[1]["final_loss"] == pytest.approx(summaries[0]["final_loss"], rel=1e-5)
    assert rerun.summary["final_loss"] == pytest.approx(uninterrupted.summary["final_loss"], rel=1e-5)

    # Raw weights, EMA weights, optimizer-driven LR and the saved (EMA) pipeline all agree.
    assert_same(weights(straight / "checkpoint-8"), weights(resumed / "checkpoint-8"))
    assert_same(
        weights(straight / "checkpoint-8", "ema.safetensors"), weights(resumed / "checkpoint-8", "ema.safetensors")
    )
    assert_same(
        weights(straight / "unet", "diffusion_pytorch_model.safetensors"),
        weights(resumed / "unet", "diffusion_pytorch_model.safetensors"),
    )
    state = [
        json.loads((folder / "checkpoint-8" / "training_state.json").read_text(encoding="utf-8"))
        for folder in (straight, resumed)
    ]
    assert state[0] == state[1] and state[0]["global_step"] == 8 and state[0]["ema"]["optimization_step"] == 8
    scheduler = [
        torch.load(folder / "checkpoint-8" / "scheduler.bin", weights_only=True) for folder in (straight, resumed)
    ]
    assert scheduler[0]["_last_lr"] == scheduler[1]["_last_lr"]
    # A different seed really changes the result (the comparison above is not vacuous).
    other = tmp_path / "other"
    train(resume_options(tmp_path, other, seed=1, max_train_steps=4, checkpointing_steps=4))
    with pytest.raises(AssertionError):
        assert_same(weights(straight / "checkpoint-4"), weights(other / "checkpoint-4"))


def test_runs_with_one_seed_and_thread_count_train_the_same_weights_whatever_the_loader_workers(tmp_path):
    """The guarantee the README states: the same seed and thread count give bit-identical weights; the data order,
    crops and degradations come from the seed, not from which worker process loads a sample."""
    trained = {}
    for name, workers in (("first", 0), ("again", 0), ("workers", 2)):
        options = dict(num_threads=1, dataloader_num_workers=workers, max_train_steps=6, checkpointing_steps=6)
        train(resume_options(tmp_path, tmp_path / name, **options))
        trained[name] = [
            weights(tmp_path / name / "checkpoint-6", file) for file in ("model.safetensors", "ema.safetensors")
        ]
    for name in ("again", "workers"):
        for first, other in zip(trained["first"], trained[name]):
            assert first.keys() == other.keys()
            assert all(torch.equal(first[key], other[key]) for key in first), name
    train(resume_options(tmp_path, tmp_path / "seed1", seed=1, num_threads=1, max_train_steps=6, checkpointing_steps=6))
    other_seed = weights(tmp_path / "seed1" / "checkpoint-6")
    assert not all(torch.equal(trained["first"][0][key], other_seed[key]) for key in other_seed)


def test_a_streamed_run_resumes_to_the_same_weights(tmp_path):
    # Accelerate drops the loader's own generator from a streamed loader, so starting an epoch's iterator drew from
    # the global RNG: before the checkpoint in the straight run, after its restore in the resumed one.
    streamed = dict(
        dataset_name="imagefolder", streaming=True, random_flip=False, max_train_steps=4, checkpointing_steps=2
    )
    straight = tmp_path / "straight"
    train(resume_options(tmp_path, straight, **streamed))
    resumed = tmp_path / "resumed"
    trainer = stop_and_resume(tmp_path, resumed, **streamed)
    assert trainer.summary["resumed_from"].endswith("checkpoint-2") and trainer.summary["steps_this_run"] == 2
    assert_same(weights(straight / "checkpoint-4"), weights(resumed / "checkpoint-4"))
    assert_same(
        weights(straight / "checkpoint-4", "ema.safetensors"), weights(resumed / "checkpoint-4", "ema.safetensors")
    )


def test_a_finished_run_extends_from_an_epoch_boundary(tmp_path):
    # 3 steps is exactly one epoch: the resumed run skips a whole epoch and must go on with the next one, as the
    # straight 6-step run does (benchmarks/convergence.py measures one run at several lengths this way).
    straight = tmp_path / "straight"
    train(resume_options(tmp_path, straight, max_train_steps=6, checkpointing_steps=3))
    extended = tmp_path / "extended"
    train(resume_options(tmp_path, extended, max_train_steps=3, checkpointing_steps=3))
    trainer = Trainer(
        resume_options(tmp_path, extended, max_train_steps=6, checkpointing_steps=3, resume_from_checkpoint="latest")
    )
    trainer.run()
    assert trainer.summary["resumed_from"].endswith("checkpoint-3") and trainer.summary["steps_this_run"] == 3
    assert_same(weights(straight / "checkpoint-6"), weights(extended / "checkpoint-6"))


def test_repeated_passes_persistent_workers_and_cached_images_train_as_plain_epochs(tmp_path):
    # --dataset_repeats 2 makes one epoch of two passes (6 steps here), each keyed as an epoch of its own: the same
    # batches as two plain epochs, so the same weights. Its two loader workers persist into the second epoch (step 7)
    # and serve a resume that skips into the middle of the first.
    plain = tmp_path / "plain"
    train(resume_options(tmp_path, plain))
    repeated = tmp_path / "repeated"
    options = dict(dataset_repeats=2, dataloader_num_workers=2)
    train(resume_options(tmp_path, repeated, **options))
    summaries = [
        json.loads((folder / "training_summary.json").read_text(encoding="utf-8")) for folder in (plain, repeated)
    ]
    assert [summary["epochs"] for summary in summaries] == [3, 2]
    assert_same(weights(plain / "checkpoint-8"), weights(repeated / "checkpoint-8"))

    resumed = tmp_path / "resumed"
    trainer = stop_and_resume(tmp_path, resumed, **options)
    assert trainer.summary["resumed_from"].endswith("checkpoint-4") and trainer.summary["steps_this_run"] == 4
    assert_same(weights(plain / "checkpoint-8"), weights(resumed / "checkpoint-8"))
    # Images decoded once into memory, shared by the workers: the same samples, so the same weights.
    cached = tmp_path / "cached"
    train(resume_options(tmp_path, cached, cache_images=True, **options))
    assert_same(weights(plain / "checkpoint-8"), weights(cached / "checkpoint-8"))
    with pytest.raises(ValueError, match="dataset_repeats must be at least 1"):
        resume_options(tmp_path, tmp_path / "none", dataset_repeats=0)


def test_interrupted_checkpoint_never_becomes_latest(tmp_path, monkeypatch):
    output = tmp_path / "out"
    train(resume_options(tmp_path, output, max_train_steps=2, checkpointing_steps=1, use_ema=False))
    assert resolve_checkpoint("latest", str(output)).endswith("checkpoint-2")

    # The next run is killed while writing checkpoint-3: accelerate has written part of its state.
    from accelerate import Accelerator

    real_save_state = Accelerator.save_state

    def killed_mid_write(self, output_dir=None, **kwargs):
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "model.safetensors"), "wb") as handle:
            handle.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(Accelerator, "save_state", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        train(
            resume_options(
                tmp_path,
                output,
                max_train_steps=4,
                checkpointing_steps=1,
                resume_from_checkpoint="latest",
                use_ema=False,
            )
        )
    leftovers = [name for name in os.listdir(output) if "checkpoint" in name]
    assert "checkpoint-3" not in leftovers and any(name.startswith(".tmp-checkpoint-3") for name in leftovers)
    assert resolve_checkpoint("latest", str(output)).endswith("checkpoint-2")
    # A checkpoint folder without its completion marker (e.g. copied half-way) is not a candidate either.
    shutil.copytree(output / "checkpoint-2", output / "checkpoint-9")
    os.remove(output / "checkpoint-9" / "training_state.json")
    assert resolve_checkpoint("latest", str(output)).endswith("checkpoint-2")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(str(output / "checkpoint-9"), str(output))
    shutil.rmtree(output / "checkpoint-9")

    # Resuming after the crash works from checkpoint-2 and cleans the half-written folder away.
    monkeypatch.setattr(Accelerator, "save_state", real_save_state)
    trainer = Trainer(
        resume_options(
            tmp_path, output, max_train_steps=4, checkpointing_steps=1, resume_from_checkpoint="latest", use_ema=False
        )
    )
    trainer.run()
    assert trainer.summary["resumed_from"].endswith("checkpoint-2") and trainer.summary["global_step"] == 4
    assert not [name for name in os.listdir(output) if name.startswith(".tmp")]
    assert [os.path.basename(path) for path in list_checkpoints(str(output))][-1] == "checkpoint-4"


def test_resume_latest_without_checkpoints_starts_fresh(tmp_path):
    trainer = Trainer(
        resume_options(
            tmp_path,
            tmp_path / "new",
            max_train_steps=1,
            checkpointing_steps=0,
            use_ema=False,
            resume_from_checkpoint="latest",
        )
    )
    trainer.run()
    assert trainer.summary["resumed_from"] is None and trainer.summary["global_step"] == 1
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        train(resume_options(tmp_path, tmp_path / "x", resume_from_checkpoint=str(tmp_path / "nowhere")))


def test_max_train_minutes_stops_with_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch):
    import time
    import types

    import diffusers_sr3.training.trainer as trainer_module

    # A clock that advances one minute per reading: the limit of 4.5 minutes is crossed after the 5th step. (The
    # data-wait timer keeps its own, real clock.)
    readings = iter(range(0, 10**6, 60))
    clock = types.SimpleNamespace(time=lambda: float(next(readings)), perf_counter=time.perf_counter)
    monkeypatch.setattr(trainer_module, "time", clock)
    limited = tmp_path / "limited"
    trainer = Trainer(resume_options(tmp_path, limited, max_train_minutes=4.5))
    trainer.run()
    monkeypatch.undo()
    assert trainer.summary["global_step"] == 5 and trainer.summary["stopped_by_time_limit"]
    assert (limited / "model_index.json").exists()  # the pipeline is saved as at a normal end
    assert [os.path.basename(path) for path in list_checkpoints(str(limited))] == ["checkpoint-4", "checkpoint-5"]

    straight = tmp_path / "straight"
    train(resume_options(tmp_path, straight))
    rerun = Trainer(resume_options(tmp_path, limited, resume_from_checkpoint="latest"))
    rerun.run()
    assert rerun.summary["steps_this_run"] == 3 and not rerun.summary["stopped_by_time_limit"]
    assert_same(weights(straight / "checkpoint-8"), weights(limited / "checkpoint-8"))
    with pytest.raises(ValueError, match="max_train_minutes"):
        resume_options(tmp_path, tmp_path / "bad", max_train_minutes=0)


def test_resuming_refuses_settings_that_change_what_the_weights_mean(tmp_path):
    output = tmp_path / "out"
    trained = dict(prediction_type="v_prediction", max_train_steps=2, checkpointing_steps=2)
    train(resume_options(tmp_path, output, **trained))
    resume = dict(trained, max_train_steps=3, resume_from_checkpoint="latest")
    checkpoint = output / "checkpoint-2"
    # Before, each of these went on silently and saved a model whose weights mean something else.
    refused = {
        "--prediction_type v_prediction there, epsilon here": dict(prediction_type=None),
        "--residual False there, True here": dict(residual=True),
        "--use_ema True there, False here": dict(use_ema=False),
        "--beta_end 0.01 there, 0.02 here": dict(beta_end=0.02),
        "--upscale_factor 4 there, 2 here": dict(upscale_factor=2),
    }
    for message, change in refused.items():
        with pytest.raises(ValueError, match="trained with other settings") as error:
            train(resume_options(tmp_path, output, **dict(resume, **change)))
        assert f"{checkpoint} was trained with other settings ({message}" in str(error.value)
        assert list_checkpoints(str(output))[-1].endswith("checkpoint-2")
    # Checkpoints written before the settings were recorded resume as they did.
    state_file = checkpoint / "training_state.json"
    state = json.loads(state_file.read_text(encoding="utf-8"))
    assert state["objective"]["prediction_type"] == "v_prediction" and state["objective"]["residual_scale"] is None
    # Those recorded before the upscale factor was compare the rest and accept any factor.
    state_file.write_text(
        json.dumps(dict(state, objective={k: v for k, v in state["objective"].items() if k != "upscale_factor"})),
        encoding="utf-8",
    )
    check_same_objective(str(checkpoint), dict(state["objective"], upscale_factor=2))
    state_file.write_text(
        json.dumps({key: value for key, value in state.items() if key != "objective"}), encoding="utf-8"
    )
    trainer = Trainer(resume_options(tmp_path, output, **resume))
    trainer.run()
    assert trainer.summary["resumed_from"].endswith("checkpoint-2") and trainer.summary["global_step"] == 3


def test_checkpoints_without_recorded_losses_still_resume(tmp_path):
    trained = dict(max_train_steps=2, checkpointing_steps=1, use_ema=False)
    resume = dict(trained, max_train_steps=3, resume_from_checkpoint="latest")
    recorded, older = tmp_path / "recorded", tmp_path / "older"
    train(resume_options(tmp_path, recorded, **trained))
    shutil.copytree(recorded, older)
    losses = json.loads((recorded / "checkpoint-2" / "training_state.json").read_text(encoding="utf-8"))[
        "recent_losses"
    ]
    assert len(losses) == 2
    train(resume_options(tmp_path, recorded, **resume))
    state = json.loads((recorded / "checkpoint-3" / "training_state.json").read_text(encoding="utf-8"))
    assert state["recent_losses"][:2] == losses and len(state["recent_losses"]) == 3
    # Saved before the losses were recorded: the resumed run averages its own steps, as it did.
    state_file = older / "checkpoint-2" / "training_state.json"
    state = json.loads(state_file.read_text(encoding="utf-8"))
    state_file.write_text(
        json.dumps({key: value for key, value in state.items() if key != "recent_losses"}), encoding="utf-8"
    )
    trainer = Trainer(resume_options(tmp_path, older, **resume))
    trainer.run()
    last = json.loads((older / "checkpoint-3" / "training_state.json").read_text(encoding="utf-8"))["recent_losses"]
    assert trainer.summary["global_step"] == 3 and len(last) == 1 and trainer.summary["final_loss"] == last[0]


def test_resuming_an_older_checkpoint_refuses_while_later_ones_remain(tmp_path):
    output = tmp_path / "out"
    train(resume_options(tmp_path, output, max_train_steps=3, checkpointing_steps=1, use_ema=False))
    assert [os.path.basename(path) for path in list_checkpoints(str(output))] == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]
    # Before, this replaced checkpoint-2, pruned it as the oldest, and left the abandoned run's checkpoint-3 to be
    # `latest`.
    older = resume_options(
        tmp_path,
        output,
        max_train_steps=2,
        checkpointing_steps=1,
        checkpoints_total_limit=1,
        use_ema=False,
        resume_from_checkpoint="checkpoint-1",
    )
    with pytest.raises(ValueError, match=r"saved after checkpoint-1 \(checkpoint-2, checkpoint-3\): move or delete"):
        train(older)
    assert len(list_checkpoints(str(output))) == 3
    shutil.rmtree(output / "checkpoint-2")
    shutil.rmtree(output / "checkpoint-3")
    trainer = Trainer(older)
    trainer.run()
    assert trainer.summary["global_step"] == 2
    assert [os.path.basename(path) for path in list_checkpoints(str(output))] == ["checkpoint-2"]


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    output = tmp_path / "out"
    for step in (4, 8):
        (output / f"checkpoint-{step}").mkdir(parents=True)
        (output / f"checkpoint-{step}" / "training_state.json").write_text(
            json.dumps({"global_step": step}), encoding="utf-8"
        )
    temporary = temporary_checkpoint_dir(str(output), 6)
    os.makedirs(temporary)
    finish_checkpoint(temporary, str(output), 6, {"global_step": 6}, None, 1)
    assert [os.path.basename(path) for path in list_checkpoints(str(output))] == ["checkpoint-6"]


def _state_only_checkpoint(output_dir, step, state=None):
    folder = os.path.join(str(output_dir), f"checkpoint-{step}")
    os.makedirs(folder)
    with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as handle:
        json.dump({"global_step": step, **(state or {})}, handle)
    return folder


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    for step in (9, 100, 10):
        _state_only_checkpoint(tmp_path, step)
    assert [os.path.basename(path) for path in list_checkpoints(str(tmp_path))] == [
        "checkpoint-9",
        "checkpoint-10",
        "checkpoint-100",
    ]
    assert resolve_checkpoint("latest", str(tmp_path)) == os.path.join(str(tmp_path), "checkpoint-100")


def test_a_measured_residual_scale_resumes_within_rounding(tmp_path):
    folder = _state_only_checkpoint(tmp_path, 4, {"objective": {"residual": True, "residual_scale": 14.2}})
    check_same_objective(folder, {"residual": True, "residual_scale": 14.2 * (1 + 1e-9)})
    with pytest.raises(ValueError, match="--residual_scale 14.2 there, 15 here"):
        check_same_objective(folder, {"residual": True, "residual_scale": 15.0})


def test_damaged_random_states_are_refused_before_resuming(tmp_path):
    import pickle
    import random

    import numpy as np

    folder = _state_only_checkpoint(tmp_path, 4)
    states = {
        "random_state": random.getstate(),
        "numpy_random_seed": np.random.get_state(),
        "torch_manual_seed": torch.get_rng_state(),
    }
    file = os.path.join(folder, "random_states_0.pkl")
    torch.save(states, file)
    check_random_states(folder, 0)
    torch.save({**states, "torch_manual_seed": torch.get_rng_state()[:100]}, file)  # cut short
    with pytest.raises(pickle.UnpicklingError, match="random_states_0.pkl is damaged"):
        check_random_states(folder, 0)


def test_resuming_with_ema_refuses_a_checkpoint_saved_without_it(tmp_path):
    from diffusers.training_utils import EMAModel

    folder = _state_only_checkpoint(tmp_path, 4)
    ema = EMAModel(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(FileNotFoundError, match="has no EMA weights .*saved without --use_ema"):
        load_checkpoint_extras(folder, ema)
    assert load_checkpoint_extras(folder, None)["global_step"] == 4


def test_a_checkpoint_of_a_wrapped_model_loads_its_trained_weights(tmp_path):
    """accelerate saves a DDP or torch.compile'd model's weights under their wrappers' prefixes."""
    from conftest import tiny_unet_config
    from safetensors.torch import save_file

    from diffusers_sr3 import SR3UNet2DModel

    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config())
    folder = _state_only_checkpoint(tmp_path, 4)
    with open(os.path.join(folder, UNET_CONFIG_FILE), "w", encoding="utf-8") as handle:
        json.dump(dict(unet.config), handle)
    wrapped = {f"module._orig_mod.{name}": value.contiguous() for name, value in unet.state_dict().items()}
    save_file(wrapped, os.path.join(folder, "model.safetensors"))
    loaded = load_checkpoint_unet(folder, use_ema=False)
    assert all(torch.equal(loaded.state_dict()[name], value) for name, value in unet.state_dict().items())
