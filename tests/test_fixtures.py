"""A clean clone passes its tests anywhere: every file the tests read ships in tests/fixtures, documented."""

import os
import re
import subprocess
import sys

from conftest import FIXTURE_ROOT, FIXTURES, PAIRS, REPO, SAMPLES

# What reaching outside the repository looks like: the CI machine's shared folder beside the clone, and its names.
OUTSIDE = re.compile(r"\.\./shared|[\"']shared[\"']|SR3_SHARED_DIR|REPO\.parent|parents\[[2-9]\]|/work/")


def test_tests_read_nothing_outside_the_repository():
    offenders = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OUTSIDE.search(line) and path.name != "test_fixtures.py":
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "tests must read fixtures from tests/fixtures:\n" + "\n".join(offenders)


def test_fixture_folders_are_in_the_repository_and_documented():
    readme = (FIXTURE_ROOT / "README.md").read_text(encoding="utf-8")
    for folder in (FIXTURES, PAIRS, SAMPLES):
        assert folder.is_dir() and folder.resolve().is_relative_to(REPO.resolve()), folder
        assert f"## {folder.name}/" in readme, f"tests/fixtures/README.md has no section for {folder.name}/"
    assert {path.name for path in FIXTURE_ROOT.iterdir() if path.is_dir()} == {
        "original_sr3",
        "metric_pairs",
        "original_samples",
    }
    # Every file of the parity folder is named ({sr3,ddpm,uncond} patterns expanded).
    named = set()
    for pattern in re.findall(r"`([^`]+\.(?:pth|pt|json|txt))`", readme):
        named.update(_expand(pattern.rsplit("/", 1)[-1]))
    missing = {path.name for path in FIXTURES.iterdir()} - named
    assert not missing, f"tests/fixtures/README.md does not say where these come from: {sorted(missing)}"
    # Small: the whole folder stays under 10 MB.
    assert sum(path.stat().st_size for path in FIXTURE_ROOT.rglob("*") if path.is_file()) < 10 * 2**20


def _expand(pattern):
    """Shell-style brace expansion: `{a,b}_x.pt` -> a_x.pt, b_x.pt."""
    match = re.search(r"\{([^}]+)\}", pattern)
    if match is None:
        return [pattern]
    return [
        name for option in match.group(1).split(",") for name in _expand(pattern.replace(match.group(0), option, 1))
    ]


def test_the_hugging_face_caches_are_this_runs_own(tmp_path):
    """The caches that the Hugging Face libraries fix when first imported (which in a whole run is while test files
    are collected, before any fixture) lie in the run's own folder, whatever the user's settings: a test never loads a
    model the user has cached, and a read-only home takes no writes."""
    users = tmp_path / "users-cache"
    probe = (
        "import conftest, datasets, evaluate, diffusers.utils.dynamic_modules_utils as modules,"
        " huggingface_hub.constants as hub;"
        "print(conftest.SESSION_HF_HOME);"
        "print(hub.HF_HUB_CACHE); print(hub.HF_ASSETS_CACHE); print(modules.HF_MODULES_CACHE);"
        "print(datasets.config.HF_DATASETS_CACHE); print(evaluate.config.HF_METRICS_CACHE);"
        "print(evaluate.config.HF_EVALUATE_CACHE)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    for name in (
        "HF_HOME",
        "HF_HUB_CACHE",
        "HUGGINGFACE_ASSETS_CACHE",
        "HF_MODULES_CACHE",
        "HF_DATASETS_CACHE",
        "HF_METRICS_CACHE",
        "HF_EVALUATE_CACHE",
    ):
        env[name] = str(users / name)
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    session, *caches = done.stdout.splitlines()
    assert all(os.path.commonpath([session, cache]) == session for cache in caches), done.stdout
    assert not os.path.exists(session)  # removed when the run ends: here, when the probe's interpreter exits
