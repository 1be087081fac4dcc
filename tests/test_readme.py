"""README's Python quickstart runs as written (with the fixture checkpoint in place of a real one)."""

import re
import shutil

from conftest import FIXTURES, REPO, SAMPLES


def python_blocks(section):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    text = readme.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_quickstart_runs(tmp_path, monkeypatch):
    code = python_blocks("Python quickstart")[0]
    code = code.replace("I640000_E37_gen.pth", str(FIXTURES / "sr3_tiny_I10_E1_gen.pth"))
    code = code.replace("config/sr_sr3_16_128.json", str(FIXTURES / "sr3_tiny_config.json"))
    shutil.copy(SAMPLES / "celebahq_16_128" / "lr_16" / "00031.png", tmp_path / "face_16.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    from PIL import Image

    assert Image.open(tmp_path / "face_128.png").size == (64, 64)  # the tiny fixture model upscales x4
    generic = python_blocks("Python quickstart")[1]
    namespace = {}
    exec(compile(generic, "README.md", "exec"), namespace)
    assert type(namespace["pipe"]).__name__ == "SR3Pipeline"


def test_architecture_section_matches_the_code():
    """Every module the map names exists, and the functions it says gamma and the steps go through do what it says."""
    import importlib
    import inspect

    text = (REPO / "README.md").read_text(encoding="utf-8").split("## Architecture", 1)[1].split("\n## ", 1)[0]
    package = REPO / "src" / "diffusers_sr3"
    for cell in re.findall(r"^\| (`[^|]+`) \|", text, flags=re.M)[1:]:
        for name in re.findall(r"`([^`]+)`", cell):
            assert (package / name).exists(), name
    for module_name, names in {
        "models.unet_sr3": ["SR3UNet2DModel", "NoiseLevelEmbedding", "ResnetBlock"],
        "noise": [
            "SR3_SCHEDULE",
            "network_inputs_for_schedule",
            "noise_level_for_step",
            "sample_training_noise_levels",
        ],
        "pipelines.base": ["SR3BasePipeline"],
        "photos": ["PHOTO_SOURCES"],
    }.items():
        module = importlib.import_module(f"diffusers_sr3.{module_name}")
        for name in names:
            assert name in text and hasattr(module, name), name
    from diffusers_sr3.models.unet_sr3 import ResnetBlock, SR3UNet2DModel
    from diffusers_sr3.pipelines.base import SR3BasePipeline

    assert "self.noise_level_embedding(signal_level)" in inspect.getsource(SR3UNet2DModel.forward)
    assert "self.embedding_proj(" in inspect.getsource(ResnetBlock.forward)
    assert "network_inputs_for_schedule(" in inspect.getsource(SR3BasePipeline._denoise)
