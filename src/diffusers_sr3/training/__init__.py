"""SR3 training: `TrainingConfig` holds every option, `train(config)` runs it (one process or `accelerate launch`).

```py
from diffusers_sr3.training import TrainingConfig, train

output_dir = train(TrainingConfig(train_data_dir="faces/", preset="sr_16_128", max_train_steps=1000))
```
"""

from typing import Any

from .config import TrainingConfig, add_training_arguments, config_from_args

__all__ = ["Trainer", "TrainingConfig", "add_training_arguments", "config_from_args", "load_checkpoint_unet", "train"]


def __getattr__(name: str) -> Any:
    # The loop pulls in accelerate, datasets and tensorboard; importing the objective alone should not.
    if name in ("Trainer", "train"):
        from . import trainer

        return getattr(trainer, name)
    if name == "load_checkpoint_unet":
        from .checkpointing import load_checkpoint_unet

        return load_checkpoint_unet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
