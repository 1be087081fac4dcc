"""README's Python quickstart runs as written (with the fixture checkpoint in place of a real one)."""

import re
import shutil

from conftest import FIXTURES, REPO, SAMPLES


def python_blocks(section):
    readme = (REPO / "README.md").read_text()
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
