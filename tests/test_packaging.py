"""What the distributions carry beside the package: the sdist's test suite, the license, the Space's requirements."""

import ast
import os
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def sdist_files(root: Path) -> list:
    """The files under `root` that MANIFEST.in adds to (or keeps out of) an sdist, as setuptools reads the template."""
    from setuptools.command.egg_info import FileList

    cwd = os.getcwd()
    os.chdir(root)  # FileList works on paths relative to the project folder
    try:
        files = FileList()
        files.findall()
        for line in (REPO / "MANIFEST.in").read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                files.process_template_line(line)
    finally:
        os.chdir(cwd)
    return files.files


def test_the_sdist_carries_the_whole_test_suite_without_bytecode(tmp_path):
    # Without MANIFEST.in setuptools adds only tests/test_*.py: no conftest.py, hub_server.py or fixtures.
    shipped = set(sdist_files(REPO))
    tests = {
        path.relative_to(REPO).as_posix()
        for path in (REPO / "tests").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo")
    }
    assert {"tests/conftest.py", "tests/hub_server.py", "tests/fixtures/README.md"} <= tests <= shipped
    # And what the tests read beside the package, not the benchmarks' pictures and reports.
    beside = ["docs/quality.md", "spaces/app.py", "spaces/README.md", "examples/train_sr3.py", "CHANGELOG.md"]
    scripts = ["benchmarks/upscale.py", "benchmarks/gpu_check.sh"]
    scripts += ["benchmarks/results/samplers/widened-network/widen.py"]
    assert set(beside + scripts) <= set(shipped)
    assert not [name for name in shipped if name.startswith("benchmarks/") and name.endswith((".png", ".json", ".md"))]
    (tmp_path / "tests" / "fixtures").mkdir(parents=True)
    (tmp_path / "tests" / "__pycache__").mkdir()
    (tmp_path / "tests" / ".pytest_cache" / "v").mkdir(parents=True)
    junk = ["__pycache__/conftest.cpython-311.pyc", "helper.pyc", ".pytest_cache/v/lastfailed", "conftest.py~"]
    for name in ("conftest.py", "fixtures/pair.png", *junk, "fixtures/.pair.png.swp", "fixtures/.DS_Store"):
        (tmp_path / "tests" / name).write_bytes(b"")
    assert sorted(sdist_files(tmp_path)) == ["tests/conftest.py", "tests/fixtures/pair.png"]


def test_the_license_is_the_apache_license_setup_names():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "END OF TERMS AND CONDITIONS" in text and text.rstrip().endswith("limitations under the License.")
    assert 'license="Apache-2.0"' in (REPO / "setup.py").read_text(encoding="utf-8")


def test_the_space_requires_what_setup_py_requires_with_the_same_floors():
    # setup.py itself, not the installed metadata, which an editable install may have written from an older setup.py.
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    call = next(
        node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"
    )
    install_requires = next(keyword.value for keyword in call.keywords if keyword.arg == "install_requires")
    expected = {Requirement(ast.literal_eval(item)) for item in install_requires.elts}
    lines = (REPO / "spaces" / "requirements.txt").read_text(encoding="utf-8").splitlines()
    listed = {Requirement(line) for line in lines if line.strip() and not line.startswith("#")}
    assert {str(requirement) for requirement in listed} == {str(requirement) for requirement in expected}
