"""Model cards (README.md with Hub metadata) for trained SR3 pipelines."""

from __future__ import annotations

import os
from typing import Dict, List, Optional

from huggingface_hub import ModelCard, ModelCardData

_METRIC_NAMES = {
    "psnr": ("PSNR (dB)", 1.0, "{:.2f}"),
    "ssim": ("SSIM", 1.0, "{:.4f}"),
    "consistency": ("Consistency (MSE x 1e-5, lower is better)", 1e5, "{:.2f}"),
}


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
    training_summary: Optional[Dict[str, object]] = None,
) -> str:
    """Write `README.md` into a saved pipeline folder and return its path.

    Args:
        output_dir: the pipeline folder.
        task: `sr` or `uncond`.
        repo_id: the Hub repo (used in the loading example; the folder name otherwise).
        upscale_factor, resolution: the model's factor and output size.
        datasets: Hub dataset ids for the metadata.
        data_description: what it was trained on, in words.
        metrics: validation metrics by name (`psnr`, `ssim`, `consistency`).
        sample_image: a picture inside `output_dir` to show (relative path).
        training_summary: key facts of the run (steps, batch size, ...), shown as a table.
    """
    name = repo_id or os.path.basename(os.path.abspath(output_dir))
    super_resolution = task == "sr"
    card_data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        pipeline_tag="image-to-image" if super_resolution else "unconditional-image-generation",
        tags=["diffusers", "sr3", "diffusers-sr3"]
        + (["super-resolution", "image-to-image"] if super_resolution else ["unconditional-image-generation"]),
        datasets=datasets or None,
    )
    if super_resolution:
        low = resolution // upscale_factor if resolution and upscale_factor else "?"
        title = f"SR3 x{upscale_factor} super-resolution ({low}px -> {resolution}px)"
        usage = (
            "from PIL import Image\n"
            "from diffusers_sr3 import SR3Pipeline\n\n"
            f'pipe = SR3Pipeline.from_pretrained("{name}")\n'
            'low_res = Image.open("input.png")\n'
            "image = pipe(low_res, num_inference_steps=50).images[0]\n"
            'image.save("output.png")'
        )
    else:
        title = f"SR3 unconditional {resolution}x{resolution} image generation"
        usage = (
            "from diffusers_sr3 import SR3UnconditionalPipeline\n\n"
            f'pipe = SR3UnconditionalPipeline.from_pretrained("{name}")\n'
            "images = pipe(batch_size=4, num_inference_steps=100).images"
        )
    lines = [
        f"# {title}",
        "",
        "An SR3 model (Saharia et al., *Image Super-Resolution via Iterative Refinement*, 2021) trained with "
        "[diffusers-sr3](https://pypi.org/project/diffusers-sr3/).",
        "",
    ]
    if data_description:
        lines += [f"Training data: {data_description}.", ""]
    if sample_image:
        caption = "LR | bicubic | SR3 | HR" if super_resolution else "samples"
        lines += [f"![{caption}]({sample_image})", "", f"*{caption}*", ""]
    if metrics:
        lines += ["## Validation metrics", "", "| Metric | Value |", "|---|---|"]
        for key, value in metrics.items():
            label, scale, form = _METRIC_NAMES.get(key, (key, 1.0, "{:.4g}"))
            lines.append(f"| {label} | {form.format(value * scale)} |")
        lines.append("")
    if training_summary:
        lines += ["## Training", "", "| Setting | Value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in training_summary.items()]
        lines.append("")
    lines += [
        "## How to use",
        "",
        "```bash",
        "pip install diffusers-sr3",
        "```",
        "",
        "```python",
        usage,
        "```",
        "",
        "Any Diffusers scheduler fits: "
        "`pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)` samples well in "
        "20-50 steps. `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` loads the "
        "model too.",
        "",
    ]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = os.path.join(output_dir, "README.md")
    card.save(path)
    return path
