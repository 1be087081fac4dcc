"""Every example in the package's docstrings, in docs/*.md, in the Space's README and in the packaged model's card runs
as written, so that none of them rots.

Docstring examples written as `>>>` sessions run under doctest (their printed results are checked); other code blocks
run as scripts. A Markdown block runs unless the line above it says `<!-- example not run: REASON -->`. Examples that
load a model the package does not ship (a face generator, face super-resolution stages, a folder of training faces)
find a tiny stand-in of that name in their working directory; only the training examples' preset and step count are
replaced (`TEXT_STAND_INS`), to keep them seconds long.
"""

import doctest
import importlib
import inspect
import os
import pathlib
import pkgutil
import re
import subprocess
import sys
import textwrap

import PIL.Image
import pytest
import torch
from conftest import REPO, SAMPLES, tiny_unet_config

import diffusers_sr3

FENCE = re.compile(r"^[ \t]*```py(?:thon)?\n(.*?)^[ \t]*```", re.S | re.M)
SKIP_MARKER = re.compile(r"^<!-- example not run: (?P<reason>\S.*?) -->$")
MARKDOWN_FILES = [*sorted((REPO / "docs").rglob("*.md")), REPO / "spaces" / "README.md"]
# What reads as an example but that neither FENCE nor doctest would run: a fence of another language (or none), an
# reStructuredText literal block ("Example::", not a directive's ".. note::"), an indented import.
UNRUN_EXAMPLE = re.compile(r"^[ \t]*```|^(?![ \t]*\.\. ).*\S::[ \t]*$|^[ \t]+(?:import \w|from [\w.]+ import )", re.M)
# Any fence-like line of Markdown; `markdown_blocks` reads only "```LANGUAGE" and "```" at the line's start.
MARKDOWN_FENCE = re.compile(r"^[ \t]*(?:```|~~~)")
PACKAGED_CARD = REPO / "src" / "diffusers_sr3" / "pretrained" / "sr3-photos-x4" / "README.md"
# The training examples train the original's 16->128 face network for thousands of steps: the tiny preset, 2 steps.
TEXT_STAND_INS = {
    "diffusers_sr3.training": {'preset="sr_16_128"': 'preset="tiny"', "max_train_steps=1000": "max_train_steps=2"},
    "diffusers_sr3.training.trainer.train": {
        'preset="sr_16_128"': 'preset="tiny"',
        "max_train_steps=100_000": "max_train_steps=2",
    },
}


def _documented_objects(module):
    yield module.__name__, module
    for name, value in vars(module).items():
        if not (inspect.isclass(value) or inspect.isfunction(value)) or value.__module__ != module.__name__:
            continue
        yield f"{module.__name__}.{name}", value
        if inspect.isclass(value):
            for attribute, member in vars(value).items():
                member = getattr(member, "__func__", getattr(member, "fget", member))
                if inspect.isfunction(member):
                    yield f"{module.__name__}.{name}.{attribute}", member


def _docstrings():
    for info in pkgutil.walk_packages(diffusers_sr3.__path__, "diffusers_sr3."):
        if info.name == "diffusers_sr3.__main__":  # runs the command line when imported
            continue
        for where, value in _documented_objects(importlib.import_module(info.name)):
            yield where, inspect.getdoc(value) or ""


def docstring_examples():
    """`(where, code)` of every example in the package's docstrings: each fenced `py` block, and a docstring's
    `>>>` lines outside any fence as one doctest."""
    examples, seen = [], set()
    for where, docstring in _docstrings():
        codes = [textwrap.dedent(code) for code in FENCE.findall(docstring)]
        rest = FENCE.sub("", docstring)
        if ">>>" in rest:
            codes.append(rest)
        for code in codes:
            if code not in seen:  # a shared example docstring (`replace_example_docstring`) runs once
                seen.add(code)
                examples.append((where, code))
    return examples


def markdown_blocks(path):
    """`(line, language, code, reason)` of every fenced block of a Markdown file; `reason` says why it is not run,
    from a marker on the line above, else None."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = re.match(r"^```(\w*)$", lines[index])
        if not opening:
            index += 1
            continue
        end = lines.index("```", index + 1)
        marker = SKIP_MARKER.match(lines[index - 1]) if index else None
        code = "\n".join(lines[index + 1 : end]) + "\n"
        blocks.append((index + 1, opening.group(1), code, marker and marker.group("reason")))
        index = end + 1
    return blocks


def _save_stand_ins(folder):
    """Tiny models under the names the examples load, and a folder of faces to train on."""
    from diffusers_sr3 import SR3Pipeline, SR3UnconditionalPipeline, SR3UNet2DModel, make_scheduler

    def unet(**overrides):
        torch.manual_seed(0)
        return SR3UNet2DModel(**tiny_unet_config(**overrides)).eval()

    generator = SR3UnconditionalPipeline(unet(in_channels=3, sample_size=8), make_scheduler("ddim", n_timestep=100))
    generator.save_pretrained(folder / "sr3-faces-128")
    generator.save_pretrained(folder / "faces-64")
    for name, size in (("faces-64-256", 32), ("faces-256-1024", 128)):
        stage = SR3Pipeline(unet(sample_size=size), make_scheduler("ddim", n_timestep=50), upscale_factor=4)
        stage.save_pretrained(folder / name)
    # A batch's worth (the default batch size, 16) of faces: the fixtures' five, in their four quarter-turns.
    (folder / "faces").mkdir()
    faces = [
        *(SAMPLES / "celebahq_16_128" / "hr_128").glob("*.png"),
        *(SAMPLES / "ffhq_64_512" / "hr_512").glob("*.png"),
    ]
    for face in faces:
        image = PIL.Image.open(face).convert("RGB").resize((128, 128), PIL.Image.BICUBIC)
        for turns in range(4):
            image.rotate(90 * turns).save(folder / "faces" / f"{face.parent.parent.name}_{face.stem}_{turns}.png")


def _run_python(code, where):
    if ">>>" not in code:
        exec(compile(code, where, "exec"), {})
        return
    test = doctest.DocTestParser().get_doctest(code, {}, where, where, 0)
    report = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


@pytest.fixture
def example_folder(tmp_path, monkeypatch):
    """A working directory holding the stand-ins, with the ONNX export cache inside it."""
    _save_stand_ins(tmp_path)
    monkeypatch.setenv("SR3_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


EXAMPLES = docstring_examples()


def test_the_docstring_examples_are_found():
    found = {where for where, _ in EXAMPLES}
    assert {
        "diffusers_sr3.backends",
        "diffusers_sr3.photos",
        "diffusers_sr3.training",
        "diffusers_sr3.training.trainer.train",
        "diffusers_sr3.evaluate_modules.sr3_metrics",
        "diffusers_sr3.evaluate_modules.sr3_metrics.Sr3Metrics",
        "diffusers_sr3.pipelines.pipeline_sr3.SR3Pipeline.__call__",
        "diffusers_sr3.pipelines.pipeline_sr3_cascade.SR3CascadePipeline.__call__",
        "diffusers_sr3.pipelines.pipeline_sr3_unconditional.SR3UnconditionalPipeline.__call__",
    } <= found


def unrun_example_lines(docstring):
    """The lines of a docstring that read as an example but that `docstring_examples` would not run."""
    return UNRUN_EXAMPLE.findall(FENCE.sub("", docstring))


@pytest.mark.parametrize(
    "docstring",
    [
        "Run it:\n\n```pycon\nimport diffusers_sr3\n```\n",
        "Run it:\n\n```\nfrom diffusers_sr3 import SR3Pipeline\n```\n",
        "Example::\n\n    sr3_metrics.compute()\n",
        "Load it offline:\n\n    import evaluate\n    sr3_metrics = evaluate.load(path)\n",
    ],
)
def test_an_example_that_would_not_run_is_noticed(docstring):
    assert unrun_example_lines(docstring)


def test_every_docstring_example_is_one_that_runs():
    """An example in a form the extractor does not read would never run: it must be a ```py block or `>>>` lines."""
    unrun = {where: lines for where, docstring in _docstrings() if (lines := unrun_example_lines(docstring))}
    assert not unrun, f"write these as ```py blocks or >>> lines: {unrun}"


@pytest.mark.parametrize(
    "where, code",
    [pytest.param(where, code, id=where) for where, code in EXAMPLES],
)
def test_docstring_example_runs(where, code, example_folder):
    for text, stand_in in TEXT_STAND_INS.get(where, {}).items():
        assert text in code, f"{where}: its example no longer says {text}; update TEXT_STAND_INS"
        code = code.replace(text, stand_in)
    if where == "diffusers_sr3.photos":  # it registers photo sources for the whole process
        from diffusers_sr3 import photos

        sources = list(photos.PHOTO_SOURCES)
        try:
            _run_python(code, where)
        finally:
            photos.PHOTO_SOURCES[:] = sources
        return
    _run_python(code, where)


def _markdown_cases():
    for path in MARKDOWN_FILES:
        for line, language, code, reason in markdown_blocks(path):
            if reason is None:
                yield pytest.param(language, code, id=f"{path.relative_to(REPO)}:{line}")


@pytest.mark.parametrize("language, code", list(_markdown_cases()))
def test_markdown_example_runs(language, code, example_folder):
    if language in ("py", "python"):
        _run_python(code, "markdown")
    else:  # shell commands, with this interpreter's scripts (`sr3`) first on the PATH
        assert not re.search(r"\bpip install\b|\bhf upload\b|push_to_hub", code), "mark it: it installs or uploads"
        path = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        subprocess.run(
            ["bash", "-ec", code], check=True, cwd=example_folder, timeout=600, env={**os.environ, "PATH": path}
        )


def test_every_markdown_block_is_run_or_says_why_not():
    for path in MARKDOWN_FILES:
        text = path.read_text(encoding="utf-8")
        fences = [line for line in text.splitlines() if MARKDOWN_FENCE.match(line)]
        assert len(fences) == 2 * len(markdown_blocks(path)), (
            f"{path}: a fence the test does not read (indented, text after its language, or ~~~), so its block "
            "never runs: open it with ```LANGUAGE and close it with ``` at the line's start"
        )
        markers = [line for line in text.splitlines() if "example not run" in line]
        assert all(SKIP_MARKER.match(line) for line in markers), f"{path}: a marker without its reason"
        assert len(markers) == sum(reason is not None for *_, reason in markdown_blocks(path)), (
            f"{path}: a marker that is not on the line above a code block"
        )


def test_the_commands_that_are_not_run_use_options_their_scripts_have():
    """Blocks too long to run, and the packaged card's record of how it was trained, still name only options that
    their scripts define (the training scripts' options are `TrainingConfig`'s fields)."""
    import dataclasses

    from diffusers_sr3.training import TrainingConfig

    training_options = {f"--{field.name}" for field in dataclasses.fields(TrainingConfig)}
    not_run = [(path, block) for path in MARKDOWN_FILES for block in markdown_blocks(path) if block[3] is not None]
    not_run += [(PACKAGED_CARD, block) for block in markdown_blocks(PACKAGED_CARD) if block[1] == "bash"]
    checked = 0
    for path, (line, _, code, _) in not_run:
        for command in re.split(r"\n|&&", code.replace("\\\n", " ")):
            command = command.split("#")[0]
            script = re.search(r"(?:python|accelerate launch) (\S+\.py)", command)
            if not script:
                continue
            source = (REPO / script.group(1)).read_text(encoding="utf-8")
            for option in re.findall(r"(?<!\S)(--[\w-]+)", command):
                known = (
                    option in training_options if script.group(1).startswith("examples/") else f'"{option}"' in source
                )
                assert known, f"{path.name}:{line}: {script.group(1)} has no {option}"
                checked += 1
    assert checked > 20


def test_the_convergence_pages_recipes_are_the_packages():
    """docs/convergence.md's two settings blocks: the recipe is `NEW_MODEL_RECIPE`, and the full list names only
    `TrainingConfig` fields, at the values of the study's `RECOMMENDED` where it sets them, and every recommended
    field whose value is not `TrainingConfig`'s default."""
    import dataclasses
    import importlib.util

    from diffusers_sr3.presets import NEW_MODEL_RECIPE
    from diffusers_sr3.training import TrainingConfig

    namespace = {}
    for _, language, code, _ in markdown_blocks(REPO / "docs" / "convergence.md"):
        if language == "python":
            exec(compile(code, "convergence.md", "exec"), namespace)
    assert namespace["NEW_MODEL_RECIPE"] == NEW_MODEL_RECIPE
    fields = {field.name for field in dataclasses.fields(TrainingConfig)}
    assert set(namespace["TRAINING"]) <= fields, set(namespace["TRAINING"]) - fields
    spec = importlib.util.spec_from_file_location("convergence_benchmark", REPO / "benchmarks" / "convergence.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    differing = {
        name: (value, study.RECOMMENDED[name])
        for name, value in namespace["TRAINING"].items()
        if name in study.RECOMMENDED and study.RECOMMENDED[name] != value
    }
    assert not differing, differing
    defaults = {field.name: field.default for field in dataclasses.fields(TrainingConfig)}
    left_out = {
        name: value
        for name, value in study.RECOMMENDED.items()
        if name in fields and value != defaults[name] and name not in namespace["TRAINING"]
    }
    assert not left_out, f"the full list leaves out {left_out}"


def test_the_packaged_models_card_runs(example_folder):
    """The card's Python, with a small photo as the `input.png` it reads."""
    from diffusers_sr3.photos import load_photo, packaged_photo_paths

    load_photo(packaged_photo_paths()[0], max_side=16).save(example_folder / "input.png")
    blocks = [code for _, language, code, _ in markdown_blocks(PACKAGED_CARD) if language == "python"]
    assert len(blocks) == 2
    for code in blocks:
        _run_python(code, "sr3-photos-x4/README.md")
    assert PIL.Image.open(example_folder / "output.png").size == (64, 64)
    assert PIL.Image.open(example_folder / "output_fidelity.png").size == (64, 64)
