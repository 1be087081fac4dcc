"""What detail mode's windows cost per pixel against the whole image, per backend: one network evaluation each.

    python benchmarks/window_cost.py                      # the packaged UNet, a 512-pixel output, 1 thread
    python benchmarks/window_cost.py --size 1024 --threads 2 --repeats 7

The progress bar counts windows as the crops their pixels fill (`window_crops_per_step`), so its early ETA, taken
from the whole image's evaluations, holds only where a window's pixel costs what a whole image's does. The UNet
runs on a `SIZE`-pixel output (one batch) and on the same pixels cut into windows of the model's training size (one
batch, as `WindowedNetwork` runs them under the default budget), in float32 (`--backend torch`) and under bfloat16
autocast (`--backend bf16`), there also with channels-last group normalisation on small samples (as before
`NCHW_GROUP_NORM_PIXELS`). Prints the best of `--repeats` timings and the windows / whole ratio; timings on a shared
machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffusers_sr3 import SR3Pipeline, backends
from diffusers_sr3.backends import AutocastUNet, cpu_name
from diffusers_sr3.pretrained import default_model_path


def best_time(network, sample: torch.Tensor, repeats: int) -> float:
    """The fastest of `repeats` evaluations of `network` on `sample`, in seconds (after one warm-up)."""
    timings = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            network(sample, 0.5, return_dict=False)
            timings.append(time.perf_counter() - start)
    return min(timings[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder (default: the packaged model)")
    parser.add_argument("--size", type=int, default=512, help="output side in pixels, a multiple of the window")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unet = SR3Pipeline.from_pretrained(args.model or default_model_path()).unet.eval()
    window = int(unet.config.sample_size)
    channels = unet.config.in_channels
    generator = torch.Generator().manual_seed(0)
    whole = torch.randn(1, channels, args.size, args.size, generator=generator)
    windows = torch.randn((args.size // window) ** 2, channels, window, window, generator=generator)
    print(f"{cpu_name()}, {args.threads} thread(s); {args.size}x{args.size} output, {len(windows)} windows of {window}")
    rows = [("torch (float32)", unet, None)]
    bf16 = AutocastUNet(unet)
    rows += [("bf16", bf16, None), ("bf16, channels-last group norm", bf16, 0)]
    default_pixels = backends.NCHW_GROUP_NORM_PIXELS
    for name, network, pixels in rows:
        backends.NCHW_GROUP_NORM_PIXELS = default_pixels if pixels is None else pixels
        seconds_whole = best_time(network, whole, args.repeats)
        seconds_windows = best_time(network, windows, args.repeats)
        print(
            f"{name:32s} whole {seconds_whole:.3f} s, windows {seconds_windows:.3f} s: "
            f"{seconds_windows / seconds_whole:.2f}x the whole image's time per pixel"
        )
    backends.NCHW_GROUP_NORM_PIXELS = default_pixels


if __name__ == "__main__":
    main()
