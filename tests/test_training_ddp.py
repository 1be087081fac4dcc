"""Two real DDP processes on CPU (gloo) through `accelerate launch examples/train_sr3.py`."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from test_data import make_image_folder
from test_training import SR_SCRIPT, as_argv, fast_options

from diffusers_sr3 import SR3UNet2DModel
from diffusers_sr3.training.checkpointing import list_checkpoints
from diffusers_sr3.training.trainer import LORA_WEIGHTS_FILE

# Runs the example script unchanged, after wrapping the functions that write files so each process records
# what it wrote, and its final weights.
RECORDER = textwrap.dedent(
    """
    import json, os, runpy, sys
    from safetensors.torch import save_file
    import diffusers_sr3.training.trainer as trainer_module
    from diffusers_sr3.pipelines import SR3BasePipeline

    record_dir, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    rank = int(os.environ["RANK"])
    writes = []

    def recording(name, function):
        def wrapper(*args, **kwargs):
            writes.append(name)
            return function(*args, **kwargs)
        return wrapper

    SR3BasePipeline.save_pretrained = recording("pipeline", SR3BasePipeline.save_pretrained)
    trainer_module.finish_checkpoint = recording("checkpoint", trainer_module.finish_checkpoint)
    trainer_module.write_model_card = recording("model_card", trainer_module.write_model_card)
    trainer_module._save_adapter = recording("adapter", trainer_module._save_adapter)
    run = trainer_module.Trainer.run

    def recorded_run(self):
        result = run(self)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if getattr(self, "discriminator", None) is not None:
            weights.update({"discriminator." + k: v.detach().cpu().contiguous()
                            for k, v in self.discriminator.state_dict().items()})
        save_file(weights, os.path.join(record_dir, f"weights-rank{rank}.safetensors"))
        info = dict(
            num_processes=self.num_processes,
            process_index=self.process_index,
            distributed_type=self.distributed_type,
            writes=writes,
            pid=os.getpid(),
            torch_seed=__import__("torch").initial_seed(),
        )
        with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(info, handle)
        return result

    trainer_module.Trainer.run = recorded_run
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "adversarial", "lora"])
def test_two_process_ddp_on_cpu(tmp_path, variant):
    adversarial_loss_weight = 0.5 if variant == "adversarial" else 0.0
    data = make_image_folder(str(tmp_path / "images"), count=8, bad=False)
    output = tmp_path / "out"
    records = tmp_path / "records"
    records.mkdir()
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER, encoding="utf-8")
    options = fast_options(
        output, train_data_dir=data, max_train_steps=3, checkpointing_steps=2, use_ema=True, validation_steps=2
    )
    if adversarial_loss_weight:
        options.update(residual=True, prediction_type="sample", adversarial_loss_weight=adversarial_loss_weight)
    if variant == "lora":
        pytest.importorskip("peft")
        from test_lora_training import pretrained

        base = pretrained(tmp_path / "base")
        options.update(preset=None, pretrained_model_name_or_path=base, lora_rank=2, learning_rate=1e-2)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(recorder),
        str(records),
        SR_SCRIPT,
        *as_argv(options),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    info = [json.loads((records / f"rank{rank}.json").read_text(encoding="utf-8")) for rank in (0, 1)]
    # Two distinct processes really ran, as one DDP job of two.
    assert [item["process_index"] for item in info] == [0, 1]
    assert all(item["num_processes"] == 2 and "MULTI_CPU" in item["distributed_type"] for item in info)
    assert info[0]["pid"] != info[1]["pid"]
    # Each process draws its own noise (same seed everywhere would train on duplicated noise).
    assert info[0]["torch_seed"] != info[1]["torch_seed"]
    # Both ranks end with identical weights (and, when trained, identical discriminators).
    first, second = (load_file(str(records / f"weights-rank{rank}.safetensors")) for rank in (0, 1))
    assert any(name.startswith("discriminator.") for name in first) == bool(adversarial_loss_weight)
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0, msg=name)
    # Only the main process writes the pipeline, the model card, the checkpoint folders and the adapter.
    expected_writes = ["adapter"] * (variant == "lora") + ["checkpoint", "model_card", "pipeline"]
    assert sorted(set(info[0]["writes"])) == expected_writes and info[0]["writes"].count("adapter") <= 1
    assert info[1]["writes"] == []
    if variant == "lora":
        # The adapters trained alike on both processes; the adapter file, once, names this UNet's layers (not the
        # DDP wrapper's `module.`), and loads onto the base model.
        assert any(".lora_A." in name for name in first)
        adapter = load_file(str(output / LORA_WEIGHTS_FILE))
        assert adapter and all(".lora_" in name and not name.startswith("module.") for name in adapter)
        SR3UNet2DModel.from_pretrained(base, subfolder="unet").load_lora_adapter(
            str(output), weight_name=LORA_WEIGHTS_FILE
        )
        assert not [name for name in os.listdir(output) if name.startswith(".sr3-lora-")]
    summary = json.loads((output / "training_summary.json").read_text(encoding="utf-8"))
    assert summary["num_processes"] == 2 and summary["total_batch_size"] == 4 and summary["global_step"] == 3
    checkpoint = list_checkpoints(str(output))[-1]
    # Each process saved its own RNG state into the one checkpoint (what exact multi-process resumes need).
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(checkpoint))
    assert "Training finished" in result.stdout and result.stdout.count("Training finished") == 1
