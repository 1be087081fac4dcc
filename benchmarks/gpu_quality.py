"""The quality issue's GPU run in one device call: a wider photo network trained for minutes, judged as shipped.

The shipped `sr3-photos-x4` restores about half the HR's edge energy on texture, and on photos never seen in training
its detail mode draws 0.538 of the HR's edge energy at FID 0.811x bicubic's (docs/quality.md): at 2-core CPU budgets
every recipe change, loss and sampler was tried. What is left is capacity and steps: this script trains the
`photos_x4` network at `--width` (default 128: 4x the multiply-adds of the shipped 64) from scratch on the training
photographs' tiles for `--minutes`,
with the shipped recipe at a large batch, packages it as the shipped model is packaged (its guide for autoguidance:
the run's own checkpoint nearest `--guide-fraction` of the steps, at `--guidance-scale`, as the shipped step 26,063 of
62,500 at scale 2), then runs `model_report.py` on it (held-out photos, never-seen photos, the original's faces;
the photos super-resolved whole, as `sr3 upscale` runs them, since detail mode draws less texture on whole photos than
on 64-pixel crops alone: docs/quality.md, "Whole photos") and saves every output as 8-bit so that FID, whose Inception
network does not travel to the device, is computed back here. `--resolution` sets the training crop size (the shipped
64; larger crops let the network see at training time more of what a whole photo shows it). What three device calls
measured, and what the next should change, is in `benchmarks/results/gpu-quality/README.md`:

    # here, once (a fresh machine takes about 3 minutes): what the device lacks, in a folder that git ignores and the
    # call carries (about 41 MB; the call also carries the tracked tree, so the packaged weights and benchmarks/results/
    # must stay behind: 64 MiB in all). The packaged photographs must be installed here first, or the held-out split
    # differs from the shipped run's; pyiqa's 5 never-seen photos come from its source archive.
    apt-get install -y mate-backgrounds plasma-workspace-wallpapers
    echo /.gpu/ >> .git/info/exclude && mkdir -p .gpu/unseen .gpu/faces
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .gpu/wheels diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 \
        multiprocess==0.70.19
    python benchmarks/shipped_photos.py --output .gpu    # .gpu/packaged, .gpu/photos: the shipped run's 78
    python3 -m pip download --no-deps --no-binary=:all: pyiqa==0.1.16 -d /tmp && tar -xzf /tmp/pyiqa-0.1.16.tar.gz \
        -C /tmp pyiqa-0.1.16/ResultsCalibra/ref_dir && cp /tmp/pyiqa-0.1.16/ResultsCalibra/ref_dir/*.bmp .gpu/unseen/
    cp -r ../shared/data/original_samples/* .gpu/faces/
    # for the calls, a throwaway branch without the packaged weights, benchmarks/results/ and tests/fixtures/ (2.4 MB
    # tracked); afterwards `git checkout main && git branch -D device-slim` puts them back
    git checkout -b device-slim && git rm -r -q benchmarks/results tests/fixtures \
        src/diffusers_sr3/pretrained/sr3-photos-x4/*/diffusion_pytorch_model.safetensors && git commit -qm slim
    # on the device: one call, carry [".gpu"], timeout 600. The script ends within `--finish-within` (540 s) of its
    # start, cutting the training to fit: call 4, before that option, spent 3.6 minutes cutting tiles in one process
    # (now on every core) and ran out of time in training. Its output is not piped: `| tail` and `| grep` buffer, and
    # a call that runs out of time returns only what it printed (call 4 and the loader probe before it returned nothing)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl \
        && PYTHONPATH=/tmp/site:src python3 benchmarks/gpu_quality.py --packaged-photos .gpu/packaged \
        --photos .gpu/photos --unseen .gpu/unseen --faces .gpu/faces --keep-model /tmp/kept --output $OUT
    # then at once, while the machine is warm (it keeps what a call wrote outside the tree for 30 s after it), one
    # call per part it printed (4 at width 128, 1 at 64), carrying nothing, timeout 60:
    python3 benchmarks/model_parts.py send /tmp/kept --part 1 --output $OUT
    # back here, on the files it returns (report.json, report.md, evaluation.png, one outputs_<set>.npz per test
    # set, each under the 16 MiB a returned file may have): FID, into a report; and the trained model, whole
    python benchmarks/gpu_quality.py --fid-of RETURNED/outputs_*.npz --output benchmarks/results/gpu-quality
    python benchmarks/model_parts.py unpack RETURNED_PART_FOLDERS --output /work/probe/gpu/model
    # the shipped model on the same crops, here (about 10 minutes), then its FID, and the two side by side
    python benchmarks/model_report.py --model src/diffusers_sr3/pretrained/sr3-photos-x4 --no-fid --save-outputs \
        --crops 256 --max-side 512 --whole-photos --unseen .gpu/unseen --unseen-crops 256 --faces .gpu/faces \
        --output SHIPPED && python benchmarks/gpu_quality.py --fid-of SHIPPED/outputs_*.npz
    python benchmarks/results/gpu-quality/side_by_side.py SHIPPED RETURNED --output FOLDER/side-by-side.png
    # to fine-tune the shipped model instead (the same network, so no cost in `sr3 upscale`; what the next call should
    # run, benchmarks/results/gpu-quality/README.md): its pipeline without the guide, the weights xz-compressed (30.5
    # -> 21.5 MB), carried in place of the faces and never-seen photos, so that all fits 64 MiB (about 56 MiB).
    # Before the slim branch, which removes the weights:
    mkdir -p .gpu/shipped/unet /work/gpu-aside && mv .gpu/faces .gpu/unseen /work/gpu-aside/
    cp -r src/diffusers_sr3/pretrained/sr3-photos-x4/{model_index.json,pipeline_sr3.py,scheduler} .gpu/shipped/
    cp src/diffusers_sr3/pretrained/sr3-photos-x4/unet/{config.json,unet_sr3.py} .gpu/shipped/unet/
    xz -9 -c src/diffusers_sr3/pretrained/sr3-photos-x4/unet/diffusion_pytorch_model.safetensors \
        > .gpu/shipped/unet/diffusion_pytorch_model.safetensors.xz
    # the call, then one send call (the unguided width-64 model is one part), then here the shipped guide put back:
    ... gpu_quality.py --fine-tune .gpu/shipped --packaged-photos .gpu/packaged --photos .gpu/photos --no-report \
        --minutes 7 --keep-model /tmp/kept --output $OUT
    python benchmarks/package_model.py --trained UNPACKED --output MODEL --guidance-scale 2 \
        --guidance-unet src/diffusers_sr3/pretrained/sr3-photos-x4/guidance_unet
    # or, for about 1.5 more minutes of training in the same call: `--no-report --minutes 7` (no --unseen, --faces),
    # then model_report.py here on the unpacked model (at width 128, sr3 upscale takes 2.4-3.3x the shipped model's
    # time: the report took 22 minutes on 2 cores)

On a CPU (no GPU found), `--width 32 --max-steps 3 --crops 4 --unseen-crops 4` runs every part in about a minute:
the test suite does, so the device call is not the first time the script runs.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_parts  # noqa: E402  (sibling scripts: the shipped model's tiles, packaging, evaluation and return)
import model_report  # noqa: E402
import package_model  # noqa: E402
import photo_tiles  # noqa: E402
from report_files import write_json  # noqa: E402

from diffusers_sr3 import photos  # noqa: E402
from diffusers_sr3.image_io import find_images  # noqa: E402
from diffusers_sr3.metrics import frechet_inception_distance  # noqa: E402
from diffusers_sr3.presets import NEW_MODEL_RECIPE, get_preset  # noqa: E402

# What a call spends around its training loop on the H200 machine, kept free by `--finish-within`: call 4 took 40 s
# from its tiles to its first step (the tiles decoded into memory); call 3 took 164 s for its tiles, the same setup,
# packaging and the report together.
SECONDS_BEFORE_TRAINING = 45
SECONDS_AFTER_TRAINING = {"report": 150, "no report": 45}


def training_minutes(args: argparse.Namespace, elapsed: float) -> float:
    """`--minutes`, cut so that a call that has run `elapsed` seconds ends within `--finish-within` seconds."""
    if args.finish_within is None:
        return args.minutes
    after = SECONDS_AFTER_TRAINING["no report" if args.no_report else "report"]
    left = (args.finish_within - elapsed - SECONDS_BEFORE_TRAINING - after) / 60
    if left < 0.5:
        raise RuntimeError(
            f"--finish-within {args.finish_within:g} s leaves {max(left, 0):.1f} minutes to train: {elapsed:.0f} s "
            f"went before it, and {SECONDS_BEFORE_TRAINING + after} s are kept for what surrounds it"
        )
    if left < args.minutes:
        print(f"training cut to {left:.2f} minutes, to finish within {args.finish_within:g} s", flush=True)
    return min(args.minutes, left)


def fine_tune_source(folder: str, work: str) -> str:
    """A copy of the pipeline `folder` for the trainer to fine-tune: its `*.xz` files decompressed (the shipped weights
    travel compressed, to fit a call's 64 MiB) and, if its guide's folder was left behind (for the same reason), its
    guidance off."""
    copy = os.path.join(work, "fine-tune-source")
    shutil.copytree(folder, copy)
    for root, _, files in os.walk(copy):
        for name in (name for name in files if name.endswith(".xz")):
            with lzma.open(os.path.join(root, name)) as packed, open(os.path.join(root, name[:-3]), "wb") as unpacked:
                shutil.copyfileobj(packed, unpacked)
            os.remove(os.path.join(root, name))
    index_file = os.path.join(copy, "model_index.json")
    index = json.load(open(index_file, encoding="utf-8"))
    if index.get("guidance_unet", [None])[0] and not os.path.isdir(os.path.join(copy, "guidance_unet")):
        write_json(index_file, dict(index, guidance_unet=[None, None], guidance_scale=1.0))
    return copy


def train_wide_model(
    tiles: str, output_dir: str, args: argparse.Namespace, minutes: float, source: Optional[str] = None
) -> str:
    """Train the `photos_x4` network at `args.width` (or fine-tune the pipeline `source`) on `tiles` with the shipped
    recipe for at most `minutes`; the saved pipeline folder."""
    from diffusers_sr3.training import TrainingConfig, train

    if source:
        network = dict(pretrained_model_name_or_path=source)
    else:
        network = dict(unet_config=dict(get_preset("photos_x4").unet_config(), block_out_channels=args.width))
    recipe = {name: value for name, value in NEW_MODEL_RECIPE.items() if name != "noise_level_embedding_scale"}
    config = TrainingConfig(
        train_data_dir=tiles,
        **network,
        resolution=args.resolution,
        upscale_factor=4,
        random_crop=True,
        random_rotate=True,
        train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_warmup_steps=args.warmup_steps,
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        max_train_steps=args.max_steps,
        max_train_minutes=minutes,
        checkpointing_steps=args.checkpoint_every,
        validation_steps=0,
        dataloader_num_workers=args.workers,
        dataset_repeats=args.dataset_repeats,
        cache_images=True,  # the tiles decoded once (about 540 MB): decoding files was most of the workers' time
        seed=0,
        output_dir=output_dir,
        **recipe,
    )
    train(config)
    return output_dir


def guide_checkpoint(output_dir: str, steps: int, fraction: float) -> Optional[Tuple[int, str]]:
    """The step and folder of the run's checkpoint nearest `fraction` of its `steps` (the final step excluded), or
    None if it saved none before."""
    from diffusers_sr3.training.checkpointing import list_checkpoints

    earlier = {int(path.rsplit("-", 1)[1]): path for path in list_checkpoints(output_dir)}
    earlier = {step: path for step, path in earlier.items() if step < steps}
    if not earlier:
        return None
    step = min(earlier, key=lambda step: abs(step - fraction * steps))
    return step, earlier[step]


def fid_of_outputs(paths: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """FID of each method saved in `paths` (`model_report.py --save-outputs`) against its set's HR, and as a
    multiple of bicubic's."""
    sets = dict(model_report.load_outputs(path) for path in paths)
    metric = frechet_inception_distance()
    table: Dict[str, Dict[str, float]] = {}

    def images(array: np.ndarray) -> torch.Tensor:  # back to [-1, 1], which model_report.fids quantizes as saved
        return torch.from_numpy(array).float() / 127.5 - 1

    for name in sorted(sets):
        methods = [method for method in sets[name] if method != "HR"]
        values = model_report.fids(metric, images(sets[name]["HR"]), [images(sets[name][m]) for m in methods])
        fids = dict(zip(methods, values))
        table[name] = dict(fids, **{f"{method} / bicubic": value / fids["bicubic"] for method, value in fids.items()})
    return table


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--fid-of",
        nargs="+",
        help="only compute FID of returned outputs_<set>.npz files (here, not on the device); with --output, "
        "the report.json beside them, with the FIDs added, goes there",
    )
    parser.add_argument("--output", help="folder for the report, the picture and the outputs_<set>.npz files")
    parser.add_argument("--photos", nargs="*", default=[], help="extra training photographs (files, folders or globs)")
    parser.add_argument(
        "--packaged-photos",
        help="a folder standing in for the packaged photographs (`diffusers_sr3.photos.PHOTO_SOURCES`), each file "
        "named by its `photo_name`, so that a machine without the Debian wallpapers splits them as this one does",
    )
    parser.add_argument("--unseen", help="folder of photos never trained on (e.g. pyiqa's ref_dir)")
    parser.add_argument("--faces", help="folder of the original's samples (holding hr_*/ folders)")
    parser.add_argument("--width", type=int, default=128, help="the network's base channels (shipped: 64)")
    parser.add_argument(
        "--fine-tune",
        help="a pipeline folder to go on training (a copy of the shipped model: see the docstring) instead of a new "
        "network at --width; its `*.xz` files are decompressed, and its guide, if it has one, guides the result",
    )
    parser.add_argument("--resolution", type=int, default=64, help="training crop size (shipped: 64)")
    parser.add_argument(
        "--minutes", type=float, default=5.5, help="training time (the whole call takes about 2.8 minutes more)"
    )
    parser.add_argument(
        "--finish-within",
        type=float,
        default=540,
        help="seconds from the script's start within which it must end: the training minutes are cut to fit (the "
        "device's commands stop at 600 s; call 4 spent 3.6 minutes cutting tiles and ran out of them). 0: no limit",
    )
    parser.add_argument("--max-steps", type=int, default=200_000, help="training steps, if the minutes allow")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=512,
        help="call 2 ran 128 at 9.8 steps/s, 2%% of an H200's bfloat16 rate (training_throughput.py's GFLOP per "
        "image): its steps were bound by their overhead, so a larger batch should cost little time per step",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=2e-4,
        help="the shipped run's; 5e-4, the width-64 recipe study's fastest start, learned nothing at width 128 and "
        "batch 128 (benchmarks/results/gpu-quality/)",
    )
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--workers", type=int, default=15, help="data loader processes (the H200 machine has 16 cores)")
    parser.add_argument(
        "--dataset-repeats",
        type=int,
        default=10,
        help="passes over the tiles per epoch (--dataset_repeats): call 3's epochs were 21 batches of 512, and its "
        "loader, refilling at each epoch's start, left the GPU waiting 52%% of the time",
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=500, help="training checkpoints, the candidates for the guide"
    )
    parser.add_argument(
        "--guide-fraction", type=float, default=0.42, help="the guide: the checkpoint nearest this share of the steps"
    )
    parser.add_argument("--guidance-scale", type=float, default=2.0, help="detail mode's autoguidance scale")
    parser.add_argument("--crops", type=int, default=256, help="held-out crops (model_report.py)")
    parser.add_argument("--unseen-crops", type=int, default=256, help="never-seen crops (model_report.py)")
    parser.add_argument(
        "--crops-alone",
        action="store_true",
        help='score each crop super-resolved on its own, as reports before docs/quality.md\'s "Whole photos" did '
        "(default: the photos whole)",
    )
    parser.add_argument("--max-side", type=int, default=512, help="held-out photos downscaled to this longer side")
    parser.add_argument(
        "--keep-model",
        help="a new folder outside the tree (the device keeps it while warm) for the packaged model in parts that "
        "each fit one call's return (model_parts.py), for the calls that follow at once to send",
    )
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="train and keep the model only (with --keep-model), to be evaluated here: about 1.5 minutes more of "
        "training in the same call",
    )
    args = parser.parse_args(argv)
    args.finish_within = args.finish_within or None
    if args.no_report and not args.keep_model:
        parser.error("--no-report keeps nothing to evaluate without --keep-model")
    if not args.fid_of and not args.output:
        parser.error("give --output (train and evaluate) or --fid-of (FID of returned outputs)")
    if args.fine_tune and not os.path.isfile(os.path.join(args.fine_tune, "model_index.json")):
        parser.error(f"--fine-tune {args.fine_tune} is not a pipeline folder (no model_index.json)")
    if args.keep_model and os.path.exists(args.keep_model):  # before minutes of training, not after
        parser.error(f"--keep-model {args.keep_model} exists: give a new folder")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    started = time.monotonic()
    args = parse_args(argv)
    if args.fid_of:
        table = fid_of_outputs(args.fid_of)
        print(json.dumps(table, indent=2))
        returned = os.path.join(os.path.dirname(os.path.abspath(args.fid_of[0])), "report.json")
        if args.output and os.path.isfile(returned):  # the returned files are read-only: the report goes elsewhere
            report = dict(json.load(open(returned, encoding="utf-8")), fid=table)
            os.makedirs(args.output, exist_ok=True)
            write_json(os.path.join(args.output, "report.json"), report)
        return table
    os.makedirs(args.output, exist_ok=True)
    if args.packaged_photos:
        if not os.path.isdir(args.packaged_photos):
            raise FileNotFoundError(f"--packaged-photos {args.packaged_photos} is not a folder")
        # In place: photo_tiles and model_report read the list when they split the photographs.
        photos.PHOTO_SOURCES[:] = [photos.PhotoSource("--packaged-photos", os.path.abspath(args.packaged_photos))]
    with tempfile.TemporaryDirectory() as work:
        tiles = os.path.join(work, "tiles")
        source = fine_tune_source(args.fine_tune, work) if args.fine_tune else None
        photo_tiles.main(["--output", tiles, "--extra", *(find_images(args.photos) if args.photos else [])])
        tiled = time.monotonic() - started
        minutes = training_minutes(args, tiled)
        trained = train_wide_model(tiles, os.path.join(work, "trained"), args, minutes, source)
        model = os.path.join(work, "model")
        summary = json.load(open(os.path.join(trained, "training_summary.json"), encoding="utf-8"))
        width = json.load(open(os.path.join(trained, "unet", "config.json"), encoding="utf-8"))["block_out_channels"]
        if source:  # the source's own guide, a weaker model still; none if it came without one
            source_guide = os.path.join(source, "guidance_unet")
            guide = (None, source_guide) if os.path.isdir(source_guide) else None
        else:
            guide = guide_checkpoint(trained, summary["global_step"], args.guide_fraction)
        guidance = ["--guidance-unet", guide[1], "--guidance-scale", str(args.guidance_scale)] if guide else []
        # As the shipped model: DDIM, bf16 weights, an earlier checkpoint of the run as the guide, detail mode in
        # windows of the training crop's size.
        windows = ["--window-size", str(args.resolution)]
        package_model.main(["--trained", trained, "--output", model, *guidance, *windows])
        kept = model_parts.pack(model, args.keep_model) if args.keep_model else None
        device = "cuda" if torch.cuda.is_available() else "cpu"
        report_args = ["--model", model, "--output", args.output, "--no-fid", "--save-outputs", "--device", device]
        # Detail mode at the settings packaging stored, as shipped.
        report_args += ["--crops", str(args.crops), "--max-side", str(args.max_side)]
        report_args += [] if args.crops_alone else ["--whole-photos"]
        if args.unseen:
            report_args += ["--unseen", args.unseen, "--unseen-crops", str(args.unseen_crops)]
        if args.faces:
            report_args += ["--faces", args.faces]
        # Without the report, the call's minutes go to training; model_report.py then runs here on the kept model.
        report = {} if args.no_report else model_report.main(report_args)
    report["training"] = dict(
        width=width,
        fine_tuned=bool(args.fine_tune),
        resolution=args.resolution,
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        steps=summary["global_step"],
        steps_per_second=summary["steps_per_second"],
        data_wait_fraction=summary["data_wait_fraction"],  # high: the loader, not the GPU, bounds the steps/s
        batch_size=args.batch_size,
        minutes=round(minutes, 2),
        seconds_before_training=round(tiled, 1),  # the tiles, mostly
        seconds=round(time.monotonic() - started, 1),
        dataset_repeats=args.dataset_repeats,
        guide_step=guide[0] if guide else None,
        kept_model_parts=len(kept["parts"]) if kept else None,
    )
    write_json(os.path.join(args.output, "report.json"), report)  # model_report's, with the training added
    for part in range(1, len(kept["parts"]) + 1) if kept else ():
        print(f"python3 benchmarks/model_parts.py send {args.keep_model} --part {part} --output $OUT")
    return report


if __name__ == "__main__":
    main()
