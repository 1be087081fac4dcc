"""`sr3 sample`: generate images with an unconditional pipeline, or a cascade that starts with one, as a grid."""

from __future__ import annotations

import argparse
import io
import math
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import PIL.Image

from .common import (
    add_model_arguments,
    add_save_process_argument,
    check_destinations,
    check_file_destination,
    image_generators,
    in_option_words,
    load_pipeline,
    per_stage,
    step_counts,
)
from .upscale import _check_prediction_type, _mode_for, check_detail_values, refuse_detail_options, save_atomically

if TYPE_CHECKING:
    from ..pipelines import SR3BasePipeline, SR3CascadePipeline

SAMPLE_STEPS = 100
MODES = ("auto", "detail", "fidelity")
# The SR stages' sampling options (argparse dests, the cascade's argument names), in the order --help lists them.
STAGE_OPTIONS = ("mode", "eta", "temperature", "strength", "guidance_scale")
# What each detail-mode option is in fidelity mode: the pipelines take these values there, so the command does too.
FIDELITY_VALUES = {"eta": 0, "temperature": 1, "strength": 1, "guidance_scale": 1}
PER_STAGE = (
    "; for a cascade's super-resolution stages (not its generator): one value for every SR stage, or a comma list "
    "with one per SR stage, an empty entry keeping that stage's default"
)


def _mode(text: str) -> str:
    """An argparse type: one of `MODES` (argparse's own `choices` would refuse a per-stage list), spaces around it
    ignored as the numbers' types ignore them (`--mode "auto, detail"`)."""
    text = text.strip()
    if text not in MODES:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(map(repr, MODES))})")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(
        parser,
        steps_help=f"sampling steps (default: {SAMPLE_STEPS}); for a cascade, one count for every stage or one per "
        "stage, generator first, such as 100,50,25, an empty entry keeping that stage's default (default: each "
        "stage's own)",
        steps_type=step_counts,
    )
    parser.add_argument(
        "--mode",
        type=per_stage(_mode),
        default=None,
        metavar="{auto,detail,fidelity}",
        help="detail (default): iterative refinement (--steps network evaluations; sharp, plausible texture); "
        "fidelity: deterministic DDIM from the noise's mean in the stage's fidelity_steps unless --steps: its "
        "estimate of the average answer (highest PSNR, smoother texture; models that predict the clean image); "
        "auto: fidelity for stages whose model predicts the clean image, else detail" + PER_STAGE,
    )
    parser.add_argument(
        "--eta",
        type=per_stage(float),
        default=None,
        help="detail mode with a DDIM sampler: 0 deterministic from the starting noise, up to 1 fresh noise at every "
        "step (default: the stage's own detail_eta, else 0)" + PER_STAGE,
    )
    parser.add_argument(
        "--temperature",
        type=per_stage(float),
        default=None,
        help="detail mode: scale of the starting noise (default 1; below 1 trades texture for fidelity)" + PER_STAGE,
    )
    parser.add_argument(
        "--strength",
        type=per_stage(float),
        default=None,
        help="detail mode: how much of the refinement runs, in (0, 1]; 1 refines from pure noise. Below 1 it "
        "starts from the fidelity answer, noised part of the way (models that predict the clean image). Default: "
        "the stage's own detail_strength, 1 for models saved without one" + PER_STAGE,
    )
    parser.add_argument(
        "--guidance-scale",
        type=per_stage(float),
        default=None,
        help="detail mode, stages saved with a guidance UNet: autoguidance scale; each step extrapolates the "
        "model's prediction away from its weaker guide's, for sharper texture at twice the evaluations per step "
        "(default: the stage's own setting; 1 turns guidance off)" + PER_STAGE,
    )
    parser.add_argument("-n", "--num-images", type=int, default=16, help="number of images")
    parser.add_argument("--output", required=True, help="grid image file (PNG, JPEG, WebP, ...)")
    parser.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--batch-size", type=int, default=4, help="images generated together")
    parser.add_argument("--size", type=int, default=None, help="output size (default: the model's; not for a cascade)")
    add_save_process_argument(
        parser,
        "also write <output>_process.png: N noisy images along the sampling of each image (default N: 8; not for "
        "a cascade)",
    )


def _check_output(output: str) -> None:
    """Refuse, before any sampling, an --output that cannot be written (`check_file_destination`) or has no
    extension of a format Pillow can write an RGB image in."""
    check_file_destination(output, "--output", "grid.png")
    image_format = PIL.Image.registered_extensions().get(os.path.splitext(output)[1].lower())
    try:
        # Some registered formats only read, or only write other modes (XBM), or need a plugin (BUFR): try one pixel.
        PIL.Image.new("RGB", (1, 1)).save(io.BytesIO(), format=image_format)
    except (KeyError, OSError, ValueError):
        raise ValueError(
            f"--output {output} needs an image file extension Pillow can write, such as .png or .jpg"
        ) from None


def _sampling_options(pipeline: SR3BasePipeline, args: argparse.Namespace) -> Dict[str, Any]:
    """The pipeline arguments of --steps, --size and --save-process, checked against the pipeline loaded."""
    from ..pipelines import SR3CascadePipeline

    given = [f"--{name.replace('_', '-')}" for name in STAGE_OPTIONS if getattr(args, name) is not None]
    if not isinstance(pipeline, SR3CascadePipeline):
        if given:
            raise ValueError(
                f"{', '.join(given)} {'sets' if len(given) == 1 else 'set'} a cascade's super-resolution stages: "
                f"{args.model} is an unconditional generator, which has none"
            )
        if isinstance(args.steps, list):
            raise ValueError(f"--steps takes one step count for {args.model}: a list (one per stage) is for a cascade")
        _check_generator_options(pipeline, args.steps or SAMPLE_STEPS, args.size)
        return dict(
            num_inference_steps=args.steps or SAMPLE_STEPS,
            height=args.size,
            width=args.size,
            num_intermediates=args.save_process,
        )
    if pipeline.base is None:
        raise ValueError(
            f"{args.model} is a cascade without a base generator: it only super-resolves images you give it; run "
            "it in Python, SR3CascadePipeline.from_pretrained(model)(image=...)"
        )
    if args.size is not None or args.save_process:
        raise ValueError(f"--size and --save-process do not apply to the cascade {args.model}: its stages set the size")
    stages = 1 + len(pipeline.stages)
    if isinstance(args.steps, list) and len(args.steps) != stages:
        raise ValueError(
            f"--steps gives {len(args.steps)} step counts for the {stages} stages of {args.model} (its generator, "
            f"then {stages - 1} super-resolution): give {stages}, or one for all"
        )
    options = dict(num_inference_steps=args.steps, **_stage_options(pipeline, args))
    try:
        pipeline.check_arguments(**options)  # every stage's, before the first batch's bar starts
    except ValueError as error:
        raise in_option_words(error, _given_to_stage(str(error), pipeline, options)) from None
    return options


def _check_generator_options(pipeline: SR3BasePipeline, steps: int, size: Optional[int]) -> None:
    """Refuse, before the first batch, the --steps that the unconditional generator's scheduler does not take and a
    --size that is no multiple of its downsampling factor, naming the options (the pipeline names its arguments)."""
    from ..pipelines.base import check_num_inference_steps

    try:
        check_num_inference_steps(steps, pipeline.scheduler)
    except ValueError as error:
        raise in_option_words(error, ["num_inference_steps"]) from None  # --steps, or its default
    factor = pipeline.unet.downsampling_factor
    if size is not None and size % factor:
        raise ValueError(f"--size must be a multiple of {factor} (the model's downsampling factor), got {size}")


def _given_to_stage(refusal: str, pipeline: SR3CascadePipeline, options: Dict[str, Any]) -> List[str]:
    """The cascade arguments in `options` whose values the command line gave the stage that `refusal` names
    ("stage_2: ..."): an empty entry of a per-stage list leaves that stage its saved default, a value of the model's."""
    from ..pipelines.pipeline_sr3_cascade import STAGE_NAMES

    names = ["base", *STAGE_NAMES[: len(pipeline.stages)]]
    stage = refusal.split(":", 1)[0]
    if stage not in names:  # not one stage's refusal: every value given counts
        return [name for name, value in options.items() if value is not None]
    index = names.index(stage)
    given = []
    for name, value in options.items():
        # Steps have an entry for the generator first; the SR stages' options, none for it.
        entry = index if name == "num_inference_steps" else index - 1
        if isinstance(value, list):
            value = value[entry] if 0 <= entry < len(value) else None
        elif entry < 0:
            value = None
        if value is not None:
            given.append(name)
    return given


def _stage_options(pipeline: SR3CascadePipeline, args: argparse.Namespace) -> Dict[str, Any]:
    """The cascade arguments of --mode, --eta, --temperature, --strength and --guidance-scale that were given, each
    one value for every SR stage or a list with one per SR stage (--mode auto resolved for each stage).

    Args:
        pipeline: the cascade loaded, with a generator.
        args: the command line.
    """
    from ..pipelines.pipeline_sr3_cascade import STAGE_NAMES

    stages = pipeline.stages
    options: Dict[str, Any] = {}
    for name in STAGE_OPTIONS:
        value = getattr(args, name)
        if isinstance(value, list) and len(value) != len(stages):
            counted = f"{len(stages)} super-resolution stage{'s' if len(stages) > 1 else ''}"
            raise ValueError(
                f"--{name.replace('_', '-')} gives {len(value)} values for the {counted} of {args.model} (its "
                f"generator takes none): give {len(stages)}, or one for all"
            )
        if value is not None:
            options[name] = value
    modes: List[Optional[str]] = pipeline._per_stage(options.get("mode"), len(stages), "mode")
    modes = [
        _mode_for(stage.scheduler.config.get("prediction_type")) if mode == "auto" else mode
        for stage, mode in zip(stages, modes)
    ]
    if "mode" in options:
        options["mode"] = modes
    # Values no model takes, and options a stage's mode or model does not take, in the options' words: the
    # pipelines' own name their arguments (`mode='detail'`, and options this command does not have). The stages
    # check the rest against their models.
    given = {key: pipeline._per_stage(options.get(key), len(stages), key) for key in FIDELITY_VALUES}
    for index, (name, stage) in enumerate(zip(STAGE_NAMES, stages)):
        values = {key: stage_values[index] for key, stage_values in given.items()}
        mode = modes[index] or "detail"  # a stage's default
        try:
            check_detail_values(values["strength"], values["eta"], values["temperature"])
            if mode == "fidelity":
                refuse_detail_options(
                    {key: None if value == FIDELITY_VALUES[key] else value for key, value in values.items()}
                )
            _check_prediction_type(values["strength"], mode, stage.scheduler.config.get("prediction_type", "epsilon"))
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
    return options


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..image_processing import grid
    from ..pipelines import SR3CascadePipeline, SR3UnconditionalPipeline
    from ..progress import bar_options

    if args.num_images < 1 or args.batch_size < 1:
        raise ValueError("--num-images and --batch-size must be at least 1")
    if args.size is not None and args.size < 1:
        raise ValueError(f"--size must be at least 1, got {args.size}")
    _check_output(args.output)
    process_path = os.path.splitext(args.output)[0] + "_process.png"
    writes = [("the grid", args.output)] + ([("the process strip", process_path)] if args.save_process else [])
    check_destinations(writes, args.overwrite)
    pipeline = load_pipeline(args, (SR3UnconditionalPipeline, SR3CascadePipeline))
    options = _sampling_options(pipeline, args)
    pipeline.set_progress_bar_config(leave=False, disable=args.quiet, **bar_options())
    images, processes = [], []
    with tqdm(total=args.num_images, desc="sampling", unit="image", disable=args.quiet, **bar_options()) as progress:
        while len(images) < args.num_images:
            count = min(args.batch_size, args.num_images - len(images))
            output = pipeline(
                batch_size=count,
                generator=image_generators(args.seed, len(images), len(images) + count),
                **options,
            )
            images += output.images
            if args.save_process:
                processes += [[snapshot[index] for snapshot in output.intermediates] for index in range(count)]
            progress.update(count)
    columns = math.ceil(math.sqrt(len(images)))
    rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    save_atomically(grid(rows), args.output, overwrite=args.overwrite)
    if processes:
        save_atomically(grid(processes), process_path, overwrite=args.overwrite)
    print(f"wrote {len(images)} images to {args.output}")
    return 0
