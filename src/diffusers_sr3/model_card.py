"""Model cards (README.md with Hub metadata) for trained SR3 pipelines."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from typing import Dict, List, Optional, Tuple, Union

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .file_writes import atomic_file
from .redaction import redact

logger = logging.getLogger(__name__)

# name, the factor from the measured value to the unit the name states, table format. The model-index stores the
# value in that unit too: consistency is an MSE of about 1e-4, reported (as in the SR3 paper) in units of 1e-5.
_METRIC_NAMES = {
    "psnr": ("PSNR (dB)", 1.0, "{:.2f}"),
    "ssim": ("SSIM", 1.0, "{:.4f}"),
    "consistency": ("Consistency (MSE in units of 1e-5, lower is better)", 1e5, "{:.2f}"),
    "edge_ratio": ("Edge energy relative to HR", 1.0, "{:.3f}"),
    "flat_grain": ("Grain on flat crops (/255)", 1.0, "{:.2f}"),
    "fid": ("FID (few images: indicative only)", 1.0, "{:.1f}"),
}

# The last line of a card this package wrote: the digest of the card above it. A repo's card that still matches its
# digest is the package's own, which a later push may replace; one that does not was edited (on the Hub, say).
_STAMP = re.compile(r"\n*<!-- diffusers-sr3 card sha256:(?P<digest>[0-9a-f]{64}) -->\s*\Z")


def write_model_card(
    output_dir: str,
    *,
    task: str,
    repo_id: Optional[str] = None,
    upscale_factor: Optional[int] = None,
    resolution: Optional[int] = None,
    datasets: Optional[List[str]] = None,
    data_description: str = "",
    metrics: Optional[Dict[str, float]] = None,
    sample_image: Optional[str] = None,
    sample_caption: Optional[str] = None,
    training_summary: Optional[Dict[str, object]] = None,
    training_command: Optional[str] = None,
    base_model: Optional[str] = None,
    lora_adapter: Optional[Tuple[str, str]] = None,
    evaluation: Optional[Dict[str, Dict[str, float]]] = None,
    reported_method: str = "SR3",
    evaluation_dataset: str = "validation images",
    limitations: Optional[str] = None,
    extra_sections: Optional[List[str]] = None,
    trained: bool = True,
) -> str:
    """Write `README.md` into a saved pipeline folder and return its path.

    Args:
        output_dir: the pipeline folder.
        task: `sr` or `uncond`.
        repo_id: the Hub repo (used in the loading example; the folder name otherwise).
        upscale_factor, resolution: the model's factor and output size.
        datasets: Hub dataset ids for the metadata.
        data_description: what it was trained on, in words (absolute paths in it are shortened to their last
            component: the card is published with the model).
        metrics: validation metrics by name (`psnr`, `ssim`, `consistency`).
        sample_image: a picture inside `output_dir` to show (relative path).
        sample_caption: what the picture shows (default: "LR | bicubic | SR3 | HR", or "samples").
        training_summary: key facts of the run (steps, batch size, ...), shown as a table.
        training_command: the exact command (or Python call) that trained it.
        base_model: the Hub id of the model it was fine-tuned from.
        lora_adapter: for a pipeline with a LoRA adapter fused in whose adapter alone lies beside it: the adapter's
            file name in `output_dir` and what `from_pretrained` loads the model it was fine-tuned from by (a Hub id,
            the packaged model's name, a folder), for the card's example that puts the adapter on that model.
        evaluation: metrics by method (`{"SR3": {...}, "bicubic": {...}}`); `reported_method`'s become the
            model-index results.
        reported_method: the `evaluation` entry reported as the model's result (e.g. "SR3 fidelity").
        evaluation_dataset: what `evaluation` (or `metrics`) was measured on.
        limitations: what the model cannot do (a default paragraph otherwise).
        extra_sections: Markdown sections appended before the usage section.
        trained: whether the card describes a training run of this package (False: a pipeline known only by its
            files, such as one converted from an original SR3 checkpoint).

    Raises:
        OSError: the card cannot be written (a full disk, a read-only folder); it names the README.md, and a card
            already there is left as it was.
    """
    name = repo_id or os.path.basename(os.path.abspath(output_dir))
    super_resolution = task == "sr"
    # 1. Hub metadata: library, license, tags, datasets, base model and model-index results.
    reported = (evaluation or {}).get(reported_method) or metrics or {}
    card_data = _card_data(
        name, super_resolution, reported, evaluation_dataset, datasets, base_model, lora=lora_adapter is not None
    )
    # 2. What the model is: title, training data, a sample picture.
    lines = _introduction(
        super_resolution, upscale_factor, resolution, data_description, sample_image, sample_caption, trained
    )
    # 3. How well it does: the evaluation table, or the validation metrics.
    lines += _results(evaluation, evaluation_dataset, metrics)
    # 4. How it was trained: the settings and the exact command.
    lines += _training(training_summary, training_command)
    # 5. What it cannot do, the caller's own sections, and how to use it.
    lines += _limitations(limitations, bool(data_description), super_resolution)
    for section in extra_sections or []:
        lines += [section.strip(), ""]
    lines += _usage(
        _loading_argument(output_dir, name),
        super_resolution,
        _predicts_clean_image(output_dir),
        _size_to_pass(output_dir, resolution),
        _fidelity_steps(output_dir),
    )
    if lora_adapter:
        lines += _adapter_usage(name, super_resolution, *lora_adapter)
    # 6. Write README.md: YAML metadata, then the text.
    # A card is published with the model: no token may reach it, whatever a caller passed in (training commands).
    card = ModelCard(redact(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)))
    path = os.path.join(output_dir, "README.md")
    # Never in place: a full disk would leave the previous card truncated.
    with atomic_file(path) as stream:
        stream.write(_stamped(str(card)).encode("utf-8"))
    return path


def write_pipeline_card(output_dir: str, pipeline: object, repo_id: Optional[str] = None) -> Optional[str]:
    """Write the card of a pipeline pushed without one (no training facts known, e.g. one converted from an original
    SR3 checkpoint): what it is and how to load it.

    Returns its path, or None for a pipeline this card does not describe (a cascade: its stages have cards of their
    own).
    """
    unet = getattr(pipeline, "unet", None)
    if unet is None:
        return None
    upscale_factor = pipeline.config.get("upscale_factor")
    return write_model_card(
        output_dir,
        task="sr" if upscale_factor else "uncond",
        repo_id=repo_id,
        upscale_factor=upscale_factor,
        resolution=unet.config.get("sample_size"),
        trained=False,
    )


def card_for_repo(folder: str, repo_id: str) -> Optional[str]:
    """The text of `folder`'s `README.md` as uploaded to the Hub repo `repo_id`, or None to upload it as it is.

    A card that `write_model_card` wrote names the model by the name it was given (for a card written at training
    time without a repo: the output folder's name) in its metadata (`model-index` / `model_name`) and its loading
    examples (`from_pretrained("name"...)`, `load_lora_adapter("name"...)`); uploaded elsewhere, the copy names
    `repo_id` there instead. Other cards (without those) are the user's own and go up unchanged; the local file is
    never changed.
    """
    with open(os.path.join(folder, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    if not text.startswith("---"):
        return None
    card = ModelCard(text, ignore_metadata_errors=True)
    name = card.data.model_name
    loading = f'from_pretrained("{name}"'
    if not isinstance(name, str) or name == repo_id or loading not in card.text:
        return None
    stamped = is_package_card(text)
    card.data.model_name = repo_id
    card.text = card.text.replace(loading, f'from_pretrained("{repo_id}"')
    card.text = card.text.replace(f'load_lora_adapter("{name}"', f'load_lora_adapter("{repo_id}"')
    # Renamed, the package's card is still its own (a later push may replace it); an edited one stays edited.
    return _stamped(str(card)) if stamped else str(card)


def is_package_card(text: str) -> bool:
    """Whether the card `text` is one `write_model_card` wrote (or `card_for_repo` renamed), unedited since."""
    match = _STAMP.search(text)
    return match is not None and match.group("digest") == _digest(text[: match.start()])


def hub_card_kept(api: object, repo_id: str) -> bool:
    """Whether the Hub repo `repo_id` has a model card that an upload must keep: any but an unedited one of this
    package's (as Diffusers' `load_or_create_model_card` keeps a repo's card), so that what its author wrote on the
    Hub is never overwritten by a later push. A card that is not UTF-8 text (a UTF-16 one from Notepad) is no card
    of this package's: kept.

    Args:
        api: the `HfApi` of the upload (its token and endpoint).
        repo_id: the repo, which exists.
    """
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = api.hf_hub_download(repo_id, "README.md")
    except EntryNotFoundError:
        return False
    try:
        with open(path, encoding="utf-8") as handle:
            return not is_package_card(handle.read())
    except UnicodeDecodeError:
        return True


def local_card_withheld(api: object, repo_id: str, folder: str, create_pr: bool = False) -> bool:
    """Whether an upload of `folder` to the Hub repo `repo_id` must leave out its `README.md`, logging why and how
    to upload it anyway (`training.hub.push_model_card`, which names the repo in the card and uploads it with the
    pictures it shows, nothing else): only a card this package wrote (`is_package_card`) defers, to a repo's card that
    `hub_card_kept` keeps; one the user wrote in the folder goes up as it is. False where the folder has no card.

    Args:
        api: the `HfApi` of the upload (its token and endpoint).
        repo_id: the repo, which exists.
        folder: the folder uploaded.
        create_pr: whether the upload opens a pull request, as the suggested one then does too.
    """
    card = os.path.join(folder, "README.md")
    try:
        with open(card, encoding="utf-8") as handle:
            written_here = is_package_card(handle.read())
    except (OSError, UnicodeDecodeError):  # no card, or not one this package wrote (which is UTF-8)
        return False
    if not written_here or not hub_card_kept(api, repo_id):
        return False
    # A Hub card without a valid stamp may be a hand-written one, one edited on the Hub, or one pushed before cards
    # were stamped: the user, not this push, can tell which.
    from .training.hub import push_model_card_command

    logger.warning(
        "%s keeps the model card it has on the Hub (written by hand, edited on the Hub, or pushed by an earlier "
        "diffusers-sr3 that did not stamp its cards); this push's card is %s; to replace the Hub's card with it, run "
        "`%s`",
        repo_id,
        card,
        push_model_card_command(os.path.abspath(folder), repo_id, create_pr),
    )
    return True


def _digest(text: str) -> str:
    # Trailing blank lines do not count: editors add or drop them without changing the card.
    return hashlib.sha256(_STAMP.sub("", text).rstrip().encode("utf-8")).hexdigest()


def _stamped(text: str) -> str:
    """`text` ending in the stamp of a card this package wrote (in place of any stamp it had)."""
    body = _STAMP.sub("", text).rstrip()
    return f"{body}\n\n<!-- diffusers-sr3 card sha256:{_digest(body)} -->\n"


def card_uploads(folder: str, repo_id: str) -> Dict[str, Union[str, bytes]]:
    """The files that put `folder`'s card on the Hub repo `repo_id`: path in the repo -> local path, or the card's
    bytes where it names the repo only once uploaded ([`card_for_repo`]); with the pictures it shows
    ([`images_shown`])."""
    uploads: Dict[str, Union[str, bytes]] = {name: os.path.join(folder, name) for name in images_shown(folder)}
    renamed = card_for_repo(folder, repo_id)
    uploads["README.md"] = os.path.join(folder, "README.md") if renamed is None else renamed.encode("utf-8")
    return uploads


def images_shown(folder: str) -> List[str]:
    """The pictures inside `folder` that its `README.md` shows (Markdown images with relative paths), as
    `/`-separated paths relative to `folder`; never a file outside it (`../a.png`, or a link out of it), which a
    repo could not hold."""
    with open(os.path.join(folder, "README.md"), encoding="utf-8") as handle:
        targets = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", handle.read())
    inside = os.path.realpath(folder) + os.sep
    return sorted(
        {
            os.path.normpath(target).replace(os.sep, "/")  # one file, however the card spells it (`./a.png`)
            for target in targets
            if "://" not in target
            and not os.path.isabs(target)
            and os.path.isfile(os.path.join(folder, target))
            and os.path.realpath(os.path.join(folder, target)).startswith(inside)
        }
    )


def _card_data(
    name: str,
    super_resolution: bool,
    reported: Dict[str, float],
    evaluation_dataset: str,
    datasets: Optional[List[str]],
    base_model: Optional[str],
    lora: bool = False,
) -> ModelCardData:
    eval_results = [
        EvalResult(
            task_type="image-to-image" if super_resolution else "unconditional-image-generation",
            dataset_type="custom",
            dataset_name=evaluation_dataset,
            metric_type=key,
            metric_name=_METRIC_NAMES.get(key, (key,))[0],
            metric_value=round(float(value) * _METRIC_NAMES.get(key, (key, 1.0))[1], 6),
        )
        for key, value in reported.items()
        # NaN or infinity (a diverged run, PSNR of an exact match) is no number in the Hub's JSON metadata.
        if isinstance(value, (int, float)) and math.isfinite(value)
    ]
    return ModelCardData(
        model_name=name,
        eval_results=eval_results or None,
        base_model=base_model,
        # Said, not left to the Hub to infer: a repo with a LoRA file in it would be listed as an adapter of the base
        # model, where it holds a whole pipeline (the adapter fused in) that loads by itself.
        **({"base_model_relation": "finetune"} if base_model else {}),
        library_name="diffusers",
        license="apache-2.0",
        pipeline_tag="image-to-image" if super_resolution else "unconditional-image-generation",
        tags=["diffusers", "sr3", "diffusers-sr3"]
        + (["super-resolution", "image-to-image"] if super_resolution else ["unconditional-image-generation"])
        + (["lora"] if lora else []),
        datasets=datasets or None,
    )


def _introduction(
    super_resolution: bool,
    upscale_factor: Optional[int],
    resolution: Optional[int],
    data_description: str,
    sample_image: Optional[str],
    sample_caption: Optional[str] = None,
    trained: bool = True,
) -> List[str]:
    if super_resolution:
        title = f"SR3 x{upscale_factor} super-resolution"
        if resolution and upscale_factor:
            title += f" ({resolution // upscale_factor}px -> {resolution}px)"
    else:
        title = (
            f"SR3 unconditional {resolution}x{resolution} image generation" if resolution else "SR3 image generation"
        )
    model = "An SR3 model (Saharia et al., *Image Super-Resolution via Iterative Refinement*, 2021)"
    if trained:
        model += " trained with diffusers-sr3, an SR3 extension of Diffusers."
    else:
        model += (
            ", saved as a pipeline of diffusers-sr3, an SR3 extension of Diffusers. How it was trained is not recorded "
            "here (it may have been converted from an original SR3 checkpoint)."
        )
    lines = [f"# {title}", "", model, ""]
    if data_description:
        lines += [f"Training data: {_without_machine_paths(data_description)}.", ""]
    if sample_image:
        caption = sample_caption or ("LR | bicubic | SR3 | HR" if super_resolution else "samples")
        alt = caption.split(",")[0]
        lines += [f"![{alt}]({sample_image})", "", f"*{caption}*", ""]
    return lines


def _without_machine_paths(text: str) -> str:
    """`text` with each absolute path (a word) shortened to its last component, as training_summary.json keeps
    folders: where the data lay on the training machine is no fact about the model."""

    def shortened(word: str) -> str:
        path = word.rstrip(".,;:)")
        if not os.path.isabs(path):
            return word
        return (os.path.basename(os.path.normpath(path)) or path) + word[len(path) :]

    return " ".join(shortened(word) for word in text.split(" "))


def _formatted(key: str, value: float) -> str:
    _, scale, form = _METRIC_NAMES.get(key, (key, 1.0, "{:.4g}"))
    return form.format(value * scale)


def _results(
    evaluation: Optional[Dict[str, Dict[str, float]]], evaluation_dataset: str, metrics: Optional[Dict[str, float]]
) -> List[str]:
    if evaluation:
        methods = list(evaluation)
        keys = [key for key in evaluation[methods[0]] if isinstance(evaluation[methods[0]][key], (int, float))]
        lines = [f"## Evaluation ({evaluation_dataset})", ""]
        lines += ["| Method | " + " | ".join(_METRIC_NAMES.get(k, (k,))[0] for k in keys) + " |"]
        lines += ["|---|" + "---|" * len(keys)]
        for method in methods:
            values = [evaluation[method].get(key) for key in keys]
            cells = ["-" if value is None else _formatted(key, value) for key, value in zip(keys, values)]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return lines + [""]
    if metrics:
        lines = [f"## Validation metrics ({evaluation_dataset})", "", "| Metric | Value |", "|---|---|"]
        lines += [
            f"| {_METRIC_NAMES.get(key, (key,))[0]} | {_formatted(key, value)} |" for key, value in metrics.items()
        ]
        return lines + [""]
    return []


def _training(training_summary: Optional[Dict[str, object]], training_command: Optional[str]) -> List[str]:
    lines: List[str] = []
    if training_summary:
        lines += ["## Training", "", "| Setting | Value |", "|---|---|"]
        lines += [f"| {key} | {_without_machine_paths(str(value))} |" for key, value in training_summary.items()]
        lines.append("")
    if training_command:
        # A Python call (`training_command` of a run started from Python) or shell commands, one per line.
        python = "import " in training_command and "TrainingConfig(" in training_command
        lines += ["## Training command", "", "```python" if python else "```bash"]
        lines += [training_command, "```", ""]
    return lines


def _limitations(limitations: Optional[str], data_known: bool = True, super_resolution: bool = True) -> List[str]:
    if limitations:
        return ["## Limitations", "", limitations, ""]
    if super_resolution:
        data = (
            "It was trained on the data above only and will do worse on other kinds of images and degradations than "
            "the bicubic downsampling it was trained on."
            if data_known
            else "It will do worse on images and degradations unlike those it was trained on."
        )
        text = (
            "A diffusion model samples a plausible high-resolution image, not the true one: details it adds may be "
            f"invented, so do not use it where exact detail matters (forensics, medicine). {data}"
        )
    else:
        data = "the data above" if data_known else "its training data"
        text = (
            f"It generates new images like {data}: it can reproduce that data's biases and, from a small dataset, "
            "near-copies of training images. Its images show no real scene, so do not present them as photographs."
        )
    return ["## Limitations", "", text, ""]


def _predicts_clean_image(output_dir: str) -> bool:
    """Whether the pipeline saved in `output_dir` predicts the clean image (so it has a fidelity mode)."""
    path = os.path.join(output_dir, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as handle:
        return json.load(handle).get("prediction_type") in ("sample", "v_prediction")


def _size_to_pass(output_dir: str, resolution: Optional[int]) -> Optional[int]:
    """`resolution` when the UNet saved in `output_dir` defaults to another output size (its `sample_size`: a model
    trained at another resolution than its config's), else None."""
    path = os.path.join(output_dir, "unet", "config.json")
    if not resolution or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        sample_size = json.load(handle).get("sample_size")
    default = tuple(sample_size) if isinstance(sample_size, (list, tuple)) else (sample_size, sample_size)
    return None if default == (resolution, resolution) else resolution


def _fidelity_steps(output_dir: str) -> int:
    """The steps of fidelity mode of the pipeline saved in `output_dir` (its `fidelity_steps`, else the default)."""
    from .pipelines.pipeline_sr3 import FIDELITY_STEPS

    path = os.path.join(output_dir, "model_index.json")
    if not os.path.isfile(path):
        return FIDELITY_STEPS
    with open(path, encoding="utf-8") as handle:
        return json.load(handle).get("fidelity_steps", FIDELITY_STEPS)


def _loading_argument(output_dir: str, name: str) -> Tuple[str, str]:
    """What `from_pretrained` is given in the card's examples, and the import that line needs (or ""): the model's
    name (its repo), or for the model packaged with diffusers_sr3 its folder, which no Hub repo holds."""
    from .pretrained import default_model_path

    try:
        packaged = os.path.realpath(output_dir) == os.path.realpath(default_model_path())
    except FileNotFoundError:  # an install without the packaged model
        packaged = False
    if packaged:
        return "default_model_path()", "from diffusers_sr3.pretrained import default_model_path\n"
    return f'"{name}"', ""


def _usage(
    loading: Tuple[str, str],
    super_resolution: bool,
    clean_image_model: bool = False,
    size: Optional[int] = None,
    fidelity_steps: int = 1,
) -> List[str]:
    argument, import_line = loading
    if super_resolution:
        usage = (
            "from PIL import Image\n"
            f"from diffusers_sr3 import SR3Pipeline\n{import_line}\n"
            f"pipe = SR3Pipeline.from_pretrained({argument})\n"
            'low_res = Image.open("input.png")\n'
            "# SR3 sampling (detail mode) at the model's own settings: steps, strength, eta saved in its config\n"
            "image = pipe(low_res).images[0]\n"
            'image.save("output.png")'
        )
        if clean_image_model:
            cost = "one evaluation" if fidelity_steps == 1 else f"{fidelity_steps} deterministic DDIM steps"
            usage += (
                f"\n# the model's estimate of the average answer: highest PSNR, no invented texture, {cost}\n"
                'pipe(low_res, mode="fidelity").images[0].save("output_fidelity.png")'
            )
    else:
        size_arguments = f", height={size}, width={size}" if size else ""
        usage = (
            f"from diffusers_sr3 import SR3UnconditionalPipeline\n{import_line}\n"
            f"pipe = SR3UnconditionalPipeline.from_pretrained({argument})\n"
            f"images = pipe(batch_size=4, num_inference_steps=100{size_arguments}).images"
        )
        if size:
            usage += "  # the size it was trained at, not its config's sample_size"
    # The package is not on PyPI: a `pip install diffusers-sr3` would install whatever someone registers under the name.
    return [
        "## How to use",
        "",
        "Both ways below need the `diffusers_sr3` package, which is not on PyPI: install it from its source, in a "
        "checkout of the diffusers-sr3 repository:",
        "",
        "```bash",
        "pip install -e .",
        "```",
        "",
        "```python",
        usage,
        "```",
        "",
        "With Diffusers' own loader (the folder carries one-line files that import the installed `diffusers_sr3`, "
        "which `trust_remote_code=True` runs; `from_pretrained` above runs no code from the folder):",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        *import_line.splitlines(),
        "",
        f"pipe = DiffusionPipeline.from_pretrained({argument}, trust_remote_code=True)",
        "```",
        "",
        "Diffusers schedulers for this model's prediction type fit (those of another noise process are refused): "
        "`from diffusers import DPMSolverMultistepScheduler; "
        "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)` samples well in "
        "20-50 steps.",
        "",
    ]


def _adapter_usage(name: str, super_resolution: bool, weight_name: str, base: str) -> List[str]:
    """How to put the LoRA adapter saved beside the fused pipeline `name` on the model it was fine-tuned from."""
    pipeline = "SR3Pipeline" if super_resolution else "SR3UnconditionalPipeline"
    # Where the base model lay on the training machine (an absolute path, or one relative to where the run was
    # started) is no name to load it by elsewhere.
    if os.path.isabs(base) or os.path.isdir(base):
        base = os.path.basename(os.path.abspath(base))
    return [
        "### The LoRA adapter alone",
        "",
        f"The pipeline above has a LoRA adapter fused into its UNet; `{weight_name}` is that adapter alone, to put on "
        'the model it was fine-tuned from (with PEFT: `pip install -e ".[lora]"`), where it can be switched off '
        "(`pipe.unet.disable_adapters()`) or combined with others (`set_adapters`):",
        "",
        "```python",
        f"from diffusers_sr3 import {pipeline}",
        "",
        f'pipe = {pipeline}.from_pretrained("{base}")',
        f'pipe.unet.load_lora_adapter("{name}", weight_name="{weight_name}")',
        "```",
        "",
    ]
