"""Training speed of `accelerate launch examples/train_sr3.py` on CPU, launched as README launches it, in one run.

    python benchmarks/training_launch.py --output benchmarks/results/training_launch

Runs the training script under `accelerate launch` with no accelerate config, no `--cpu` and no OMP_NUM_THREADS in
the environment (a fresh shell), for --steps steps of --preset at --batch and --resolution, on --photos packaged
photographs downscaled to 256 pixels (so that decoding large JPEGs does not dominate), once for each arm:

- `one thread`: `--num_threads 1`, the one thread `accelerate launch` leaves a process it does not know to be a CPU
  job (OMP_NUM_THREADS=1), which every CPU training under `accelerate launch` had before `--num_threads`;
- `default`: `--num_threads` unset, so training takes the cores this process may run on;
- `default, bf16`: the same under `--mixed_precision bf16`, fast only on CPUs with native bfloat16 (AMX, AVX512-BF16).

Steps/s come from each run's training_summary.json (its training seconds, the first step included, which is the
same for every arm). Timings on shared machines are noisy: compare the ratios within one run. Writes
training_launch.json and training_launch.md to --output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

from diffusers_sr3.backends import cpu_name, fast_bfloat16
from diffusers_sr3.photos import load_photo, packaged_photo_paths

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_files import write_report  # noqa: E402  (a sibling script: where results are written)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = {
    "one thread": ["--num_threads", "1"],
    "default": [],
    "default, bf16": ["--mixed_precision", "bf16"],
}


def write_photos(folder: str, count: int) -> str:
    """`count` packaged photographs, downscaled to 256 pixels on the longer side, as PNG files in `folder`."""
    os.makedirs(folder, exist_ok=True)
    for number, path in enumerate(packaged_photo_paths()[:count]):
        load_photo(path, 256).save(os.path.join(folder, f"{number:03d}.png"))
    return folder


def launch(arm: str, args: argparse.Namespace, photos: str, output_dir: str) -> Dict[str, Any]:
    """Train one arm under `accelerate launch`; return its training summary."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--dynamo_backend", "no", "--mixed_precision", "no",
        os.path.join(REPO, "examples", "train_sr3.py"),
        "--preset", args.preset, "--train_data_dir", photos,
        "--random_crop", "--resolution", str(args.resolution), "--residual", "--residual_scale", "14.2",
        "--prediction_type", "sample", "--per_sample_timestep", "--train_batch_size", str(args.batch),
        "--max_train_steps", str(args.steps), "--checkpointing_steps", "0", "--validation_steps", "0",
        "--num_validation_images", "1", "--validation_steps_count", "1", "--report_to", "none", "--seed", "0",
        "--output_dir", output_dir, *ARMS[arm],
    ]  # fmt: skip
    environment = {name: value for name, value in os.environ.items() if name != "OMP_NUM_THREADS"}
    environment["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory() as config_home:
        environment["HF_HOME"] = config_home  # no accelerate config: the defaults a fresh machine has
        finished = subprocess.run(command, env=environment, capture_output=True, text=True)
    if finished.returncode:
        raise RuntimeError(f"arm {arm!r} failed:\n{finished.stderr[-3000:]}")
    with open(os.path.join(output_dir, "training_summary.json"), encoding="utf-8") as handle:
        return json.load(handle)


def markdown(report: Dict[str, Any]) -> str:
    lines = [
        f"# Training under `accelerate launch` on CPU ({report['machine']})",
        "",
        f"`{report['preset']}`, batch {report['batch']} of {report['resolution']}x{report['resolution']} crops, "
        f"{report['steps']} steps per arm, no accelerate config and no `--cpu`.",
        "",
        f"| arm | CPU threads | steps / s | images / s | vs {report['speedup_against']} |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['arm']} | {row['cpu_threads']} | {row['steps_per_second']:.3f} | "
            f"{row['images_per_second']:.2f} | {row['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="photos_x4")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per arm")
    parser.add_argument("--photos", type=int, default=16, help="packaged photographs to crop from (at least --batch)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--output", default="benchmarks/results/training_launch")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch, args.photos) < 1:
        parser.error("--steps, --batch and --photos must be at least 1")
    if args.photos < args.batch:
        parser.error(f"--photos {args.photos} is fewer than --batch {args.batch}: a batch needs that many images")
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as runs:
        photos = write_photos(os.path.join(runs, "photos"), args.photos)
        for number, arm in enumerate(args.arms):
            summary = launch(arm, args, photos, os.path.join(runs, str(number)))
            rows.append(
                dict(
                    arm=arm,
                    cpu_threads=summary["cpu_threads"],
                    steps_per_second=summary["steps_per_second"],
                    images_per_second=summary["steps_per_second"] * args.batch,
                )
            )
            print(f"{arm}: {summary['cpu_threads']} threads, {summary['steps_per_second']} steps/s", flush=True)
    reference = next((row for row in rows if row["arm"] == "one thread"), rows[0])
    for row in rows:
        row["speedup"] = row["steps_per_second"] / reference["steps_per_second"]
    report = dict(
        machine=f"{cpu_name()}, {os.cpu_count()} logical CPUs, bfloat16 matrix units: {fast_bfloat16('cpu')}",
        preset=args.preset,
        batch=args.batch,
        resolution=args.resolution,
        steps=args.steps,
        speedup_against=reference["arm"],
        rows=rows,
    )
    text = write_report(args.output, "training_launch", report, markdown(report))
    print(text)
    return report


if __name__ == "__main__":
    main()
