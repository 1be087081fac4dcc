r"""Train an unconditional SR3 image generator (the original's 128x128 faces model) with Accelerate.

    accelerate launch examples/train_uncond.py --train_data_dir faces/ --preset uncond_128 --use_ema \
        --train_batch_size 16 --max_train_steps 1000000 --mixed_precision bf16 --output_dir sr3-faces-128

Every option is a field of `diffusers_sr3.training.TrainingConfig`: see `--help` and README's "Training" section.
"""

import sys

from diffusers_sr3.training.cli import main

if __name__ == "__main__":
    sys.exit(main(task="uncond", description=__doc__))
