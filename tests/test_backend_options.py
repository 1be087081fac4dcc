"""Options the backends module resolves for every command: the `--device` a machine has, and the export cache."""

import os

import pytest
import torch

from diffusers_sr3.backends import cache_dir, resolve_device


def test_resolve_device_accepts_the_cpu_and_refuses_devices_this_machine_lacks(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    for name in ("meta", "xpu", "xpu:1", "hpu"):
        with pytest.raises(ValueError, match=f"--device {name}: .*try --device cpu") as error:
            resolve_device(name)
        assert "\n" not in str(error.value)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 1)
    assert resolve_device("xpu") == torch.device("xpu")
    with pytest.raises(ValueError, match="--device xpu:1: this machine has 1 usable xpu device"):
        resolve_device("xpu:1")


def test_cache_dir_honours_xdg_cache_home_under_sr3_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("SR3_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == os.path.join(str(tmp_path / "home"), ".cache", "diffusers-sr3")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == os.path.join(str(tmp_path / "xdg"), "diffusers-sr3")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # the XDG spec says to ignore relative paths
    assert cache_dir() == os.path.join(str(tmp_path / "home"), ".cache", "diffusers-sr3")
    monkeypatch.setenv("SR3_CACHE_DIR", str(tmp_path / "sr3"))
    assert cache_dir() == str(tmp_path / "sr3")
