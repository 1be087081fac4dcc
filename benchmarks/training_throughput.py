"""Training throughput of the shipped configuration against the previous packaged one, measured in one run.

    python benchmarks/training_throughput.py --output benchmarks/results/training_throughput

Times optimizer steps of the real training objective (`diffusers_sr3.training.objective`: the scaled residual,
x0 prediction, per-sample noise levels, AdamW) on a batch of random crops at the network's sample size (64x64 for
both shipped networks) for each network and precision:

- `previous`: the network the packaged `sr3-photos-x4` had before the quality issue (full output resolution,
  width 32, multipliers 1-2-4-8, attention at 8x8; 15.2M parameters);
- `photos_x4`: the shipped preset (pixel-unshuffle by 4, the UNet on the 16x16 grid; 15.2M parameters);
- any other preset name (`tiny` for the tests);

each in float32 and under bfloat16 autocast (what `--mixed_precision bf16` does; fast only on hardware with
native bfloat16, e.g. CPUs with AMX or AVX512-BF16), at each `--batch`. Reports seconds per step (median after a
warm-up step), steps/s, images/s, the network's GFLOP per image for a forward and backward pass
(`torch.utils.flop_counter`) and the TFLOP/s that makes, and the speed-up over the first row. Timings on shared
machines are noisy: compare the ratios within one run. Writes training_throughput.json and .md to --output.

On a GPU, whether a larger batch is nearly free (the steps bound by their overhead, not by arithmetic; the GPU run's
width-128 network at batch 128 used about 2% of an H200's bfloat16 rate):

    python3 benchmarks/training_throughput.py --device cuda --networks photos_x4 --width 128 --precisions bf16 \
        --batch 128 512 1024 --steps 10 --output $OUT/throughput
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from diffusers.training_utils import EMAModel
from torch.utils.flop_counter import FlopCounterMode

from diffusers_sr3 import SR3UNet2DModel, make_scheduler
from diffusers_sr3.backends import cpu_name
from diffusers_sr3.noise import training_betas
from diffusers_sr3.presets import get_preset
from diffusers_sr3.training.objective import diffusion_loss, noise_batch, predict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_files import write_report  # noqa: E402  (a sibling script: where results are written)

# The packaged model's UNet config before the low-resolution network (git history of pretrained/sr3-photos-x4).
PREVIOUS_PACKAGED = dict(
    in_channels=6,
    out_channels=3,
    block_out_channels=32,
    channel_multipliers=(1, 2, 4, 8),
    attention_resolutions=(8,),
    layers_per_block=2,
    norm_groups=32,
    sample_size=64,
    noise_level_embedding_scale=1000.0,
)
RESIDUAL_SCALE = 14.2  # the shipped run's measured scale (any value costs the same)


def network_config(name: str, width: Optional[int] = None) -> Dict[str, Any]:
    """The UNet config of `name`, at base width `width` if given."""
    config = dict(PREVIOUS_PACKAGED) if name == "previous" else get_preset(name).unet_config()
    return config if width is None else dict(config, block_out_channels=width)


def training_step(config: Dict[str, Any], bfloat16: bool, batch: int, device: str, seed: int = 0) -> Callable[[], Any]:
    """One optimizer step of the shipped objective on a fixed batch of random crops, as a function."""
    torch.manual_seed(seed)
    unet = SR3UNet2DModel(**config).train().to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-4)
    betas = training_betas(make_scheduler("ddpm"))  # on the CPU, as in the trainer
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    hr = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    condition = (hr + 0.1 * torch.randn(hr.shape, generator=generator)).clamp(-1, 1)
    hr, condition = hr.to(device), condition.to(device)
    device_type = torch.device(device).type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if bfloat16 else contextlib.nullcontext()

    def step() -> torch.Tensor:
        noised = noise_batch(
            unet,
            betas,
            hr,
            condition,
            prediction_type="sample",
            per_sample_timestep=True,
            residual=True,
            residual_scale=RESIDUAL_SCALE,
        )  # from the global RNGs, as the trainer draws: the noise on the device
        with autocast:
            prediction = predict(unet, noised)
        loss = diffusion_loss(prediction.float(), noised, "l1", None, "sample")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def time_steps(config: Dict[str, Any], bfloat16: bool, batch: int, steps: int, device: str = "cpu") -> float:
    """Median seconds per optimizer step (after one warm-up step) of the network of `config`."""
    step = training_step(config, bfloat16, batch, device)
    step()
    timings = []
    for _ in range(steps):
        started = time.perf_counter()
        step().item()  # waits for the device
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def time_ema_update(config: Dict[str, Any], device: str, foreach: bool, steps: int = 20) -> float:
    """Median seconds (after a warm-up update) of one update of diffusers' `EMAModel` of the network of `config`, as
    the trainer keeps it at every optimizer step: a loop over the parameters, or one multi-tensor (`foreach`) update."""
    unet = SR3UNet2DModel(**config).to(device)
    parameters = list(unet.parameters())
    ema = EMAModel(parameters, decay=0.999, use_ema_warmup=True, foreach=foreach)
    timings = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        ema.step(parameters)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings[1:])


def gflop_per_image(config: Dict[str, Any]) -> float:
    """Forward and backward GFLOP of one image through the network of `config` (a batch of 2, counted on the CPU)."""
    step = training_step(config, False, 2, "cpu")
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 2 / 1e9


def training_data(folder: str, seed: int = 0, **options: Any) -> Any:
    """The shipped recipe's training data from the images in `folder` (x4, random 64-pixel crops, rotations, flips)."""
    from diffusers_sr3.data.building import build_training_data

    return build_training_data(
        resolution=64,
        upscale_factor=4,
        train_data_dir=folder,
        random_crop=True,
        random_rotate=True,
        seed=seed,
        **options,
    )


def loader_samples_per_second(folder: str, samples: int, cache_images: bool = False) -> float:
    """Training samples per second that one thread cuts from the images in `folder` as the shipped recipe does (what
    each data loader worker does), decoding each image's file, or with `cache_images` from memory."""
    data = training_data(folder, cache_images=cache_images)
    order = list(iter(data.sampler))
    data.dataset[order[0]]  # the first image opened
    started = time.perf_counter()
    for index in range(samples):
        data.dataset[order[(1 + index) % len(order)]]
    return samples / (time.perf_counter() - started)


def loader_epochs(folder: str, workers: int, batch: int, repeats: int, seed: int = 0) -> List[Dict[str, Any]]:
    """The trainer's data loader with `workers` processes over `2 * repeats` passes of the images in `folder`, three
    ways: as before (its workers restarted at every epoch), as now (persistent workers), and with `--dataset_repeats
    repeats`. Each row: samples/s, and the mean wait for an epoch's first batch (the loader refilling: on a small
    dataset at a large batch, a whole epoch is about as many batches as the workers hold in flight)."""
    from torch.utils.data import DataLoader

    from diffusers_sr3.training.trainer import training_dataloader

    rows = []
    for label, passes_per_epoch, persistent, cache_images in (
        ("workers restart every epoch (before)", 1, False, False),
        ("persistent workers", 1, True, False),
        (f"persistent workers, --dataset_repeats {repeats}", repeats, True, False),
        (f"persistent workers, --dataset_repeats {repeats} --cache_images", repeats, True, True),
    ):
        data = training_data(folder, seed, repeats=passes_per_epoch, cache_images=cache_images)
        loader = (
            training_dataloader(data, batch, workers, seed)
            if persistent
            else DataLoader(data.dataset, batch_size=batch, sampler=data.sampler, num_workers=workers, drop_last=True)
        )
        epochs, batches, first_waits = 2 * repeats // passes_per_epoch, 0, []
        started = time.perf_counter()
        for epoch in range(epochs):
            data.sampler.set_epoch(epoch)
            asked = time.perf_counter()
            for index, _ in enumerate(loader):
                if index == 0:
                    first_waits.append(time.perf_counter() - asked)
                batches += 1
        seconds = time.perf_counter() - started
        rows.append(
            dict(
                loader=label,
                workers=workers,
                batch=batch,
                epochs=epochs,
                batches_per_epoch=len(loader),
                samples_per_second=batches * batch / seconds,
                first_batch_wait=statistics.mean(first_waits),
            )
        )
        print(f"{label}: {rows[-1]['samples_per_second']:.0f} samples/s", flush=True)
    for row in rows:
        row["speedup"] = row["samples_per_second"] / rows[0]["samples_per_second"]
    return rows


def markdown(report: Dict[str, Any]) -> str:
    lines = [f"# Training throughput ({report['machine']})"]
    if report["rows"]:
        lines += [
            "",
            "Batches of crops at each network's sample size (64x64 for both shipped networks), median of "
            f"{report['steps']} steps after a warm-up step, the training objective of the shipped recipe (scaled "
            "residual, x0 prediction, AdamW). GFLOP per image: forward and backward (torch.utils.flop_counter).",
            "",
            "| network | parameters | batch | precision | s / step | steps / s | images / s | GFLOP / image | TFLOP/s "
            "| vs first row |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for row in report["rows"]:
        lines.append(
            f"| {row['network']} | {row['parameters'] / 1e6:.1f}M | {row['batch']} | {row['precision']} "
            f"| {row['seconds_per_step']:.3f} | {row['steps_per_second']:.2f} | {row['images_per_second']:.1f} "
            f"| {row['gflop_per_image']:.2f} | {row['tflop_per_second']:.2f} | {row['speedup']:.2f}x |"
        )
    if report.get("ema"):
        lines += [
            "",
            "The EMA update the trainer makes after every optimizer step (diffusers' `EMAModel`, median of 20), over "
            "the parameters one at a time (three kernels each) or in one multi-tensor update (`foreach=True`, what "
            "the trainer uses):",
            "",
            "| network | parameter tensors | loop (ms) | foreach (ms) | foreach speed-up |",
            "|---|---|---|---|---|",
        ]
        for row in report["ema"]:
            lines.append(
                f"| {row['network']} | {row['tensors']} | {row['loop_seconds'] * 1000:.2f} "
                f"| {row['foreach_seconds'] * 1000:.2f} | {row['loop_seconds'] / row['foreach_seconds']:.2f}x |"
            )
    if report.get("loader"):
        loader = report["loader"]
        lines += [
            "",
            f"Data loader: one thread cuts {loader['samples_per_second']:.0f} training samples per second from "
            f"{loader['folder']} (what each of `--dataloader_num_workers` does), "
            f"{loader['cached_samples_per_second']:.0f} from images decoded into memory (`--cache_images`).",
        ]
    if report.get("loader", {}).get("epochs"):
        lines += [
            "",
            "The trainer's data loader epoch after epoch (`training_dataloader`), the same passes over the folder in "
            "each row; the wait for an epoch's first batch is the loader refilling:",
            "",
            "| loader | workers | batch | epochs | batches / epoch | samples / s | first-batch wait (s) | vs first |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in report["loader"]["epochs"]:
            lines.append(
                f"| {row['loader']} | {row['workers']} | {row['batch']} | {row['epochs']} | {row['batches_per_epoch']} "
                f"| {row['samples_per_second']:.0f} | {row['first_batch_wait']:.2f} | {row['speedup']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--networks",
        nargs="*",
        default=["previous", "photos_x4"],
        help="previous or preset names (none: time the --loader only)",
    )
    parser.add_argument("--width", type=int, default=None, help="every network at this base width (default: its own)")
    parser.add_argument("--precisions", nargs="+", default=["float32", "bf16"], choices=["float32", "bf16"])
    parser.add_argument("--batch", type=int, nargs="+", default=[16], help="batch sizes")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--loader", help="also time the data path on this folder of training images (one thread)")
    parser.add_argument("--loader-samples", type=int, default=600)
    parser.add_argument(
        "--loader-workers",
        type=int,
        default=0,
        help="with --loader, also time the trainer's loader with this many processes, epoch after epoch",
    )
    parser.add_argument("--loader-batch", type=int, default=64, help="its batch size")
    parser.add_argument("--loader-repeats", type=int, default=4, help="its --dataset_repeats row")
    parser.add_argument("--output", default="benchmarks/results/training_throughput")
    args = parser.parse_args(argv)
    if args.steps < 1 or min(args.batch) < 1:
        parser.error("--steps and --batch must be at least 1")
    if not args.networks and not args.loader:
        parser.error("nothing to time: give --networks names or a --loader folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: List[Dict[str, Any]] = []
    ema_rows: List[Dict[str, Any]] = []
    for name in args.networks:
        config = network_config(name, args.width)
        tensors = list(SR3UNet2DModel(**config).parameters())
        parameters = sum(tensor.numel() for tensor in tensors)
        loop, foreach = (time_ema_update(config, args.device, foreach) for foreach in (False, True))
        ema_rows.append(dict(network=name, tensors=len(tensors), loop_seconds=loop, foreach_seconds=foreach))
        print(f"{name} EMA update: {loop * 1000:.2f} ms in a loop, {foreach * 1000:.2f} ms foreach", flush=True)
        gflop = gflop_per_image(config)
        for batch in args.batch:
            for precision in args.precisions:
                seconds = time_steps(config, precision == "bf16", batch, args.steps, args.device)
                rows.append(
                    dict(
                        network=name,
                        parameters=parameters,
                        batch=batch,
                        precision=precision,
                        seconds_per_step=seconds,
                        steps_per_second=1 / seconds,
                        images_per_second=batch / seconds,
                        gflop_per_image=gflop,
                        tflop_per_second=gflop * batch / seconds / 1000,
                    )
                )
                print(f"{name} batch {batch} {precision}: {seconds:.3f} s/step", flush=True)
    for row in rows:
        row["speedup"] = rows[0]["seconds_per_step"] / row["seconds_per_step"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    report = dict(
        machine=f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        width=args.width,
        steps=args.steps,
        rows=rows,
        ema=ema_rows,
    )
    if args.loader:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a loader worker
        try:
            rates = [loader_samples_per_second(args.loader, args.loader_samples, cache) for cache in (False, True)]
        finally:
            torch.set_num_threads(previous)
        report["loader"] = dict(
            folder=os.path.basename(os.path.normpath(args.loader)),
            samples_per_second=rates[0],
            cached_samples_per_second=rates[1],
        )
        if args.loader_workers:
            report["loader"]["epochs"] = loader_epochs(
                args.loader, args.loader_workers, args.loader_batch, args.loader_repeats
            )
    text = write_report(args.output, "training_throughput", report, markdown(report))
    print(text)
    return report


if __name__ == "__main__":
    main()
