"""The default CPU thread count: torch's own on an idle machine, fewer where other processes hold the cores."""

import os

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_sr3 import backends
from diffusers_sr3.backends import default_cpu_threads
from diffusers_sr3.cli import main


@pytest.fixture
def machine(monkeypatch):
    """A machine of `cores` cores (this process may run on `usable` of them) where `others` tasks of other processes
    are runnable now, with torch at 2 threads at start-up."""
    monkeypatch.setattr(backends, "TORCH_THREADS_AT_START", 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def set_machine(others, cores=2, usable=None):
        monkeypatch.setattr(backends, "runnable_tasks_besides_this_one", lambda: others)
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(usable or cores)), raising=False)

    return set_machine


def test_an_idle_machine_keeps_torchs_thread_count(machine):
    for others in (0, 0.5):  # a task that comes and goes (a desktop's) keeps every thread
        machine(others)
        assert default_cpu_threads() == (2, "torch's default")


def test_a_busy_machine_gets_the_cores_its_runnable_tasks_leave_free(machine):
    machine(5)  # the audit's 2-core machine: two threads ran a training step 25x slower than one
    threads, why = default_cpu_threads()
    assert threads == 1 and why == "other processes keep the cores busy (5 runnable tasks besides this one on 2 cores)"
    machine(1)
    assert default_cpu_threads()[0] == 1
    backends.TORCH_THREADS_AT_START = 8
    machine(2, cores=8)
    assert default_cpu_threads()[0] == 6
    # A process held to 2 of 64 cores sees its share of the machine's tasks: 16 / 32 of a core.
    backends.TORCH_THREADS_AT_START = 2
    machine(16, cores=64, usable=2)
    assert default_cpu_threads() == (2, "torch's default")
    machine(64, cores=64, usable=2)
    assert default_cpu_threads()[0] == 1


def test_the_count_starts_from_torchs_at_start_up_not_from_an_earlier_commands(machine):
    """A busy moment that set 1 thread for one command must not hold the next command of the process at 1."""
    machine(5)
    torch.set_num_threads(default_cpu_threads()[0])
    try:
        machine(0)
        assert default_cpu_threads() == (2, "torch's default")
    finally:
        torch.set_num_threads(2)


def test_an_explicit_omp_num_threads_or_no_task_count_keeps_torchs_count(machine, monkeypatch):
    machine(9)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert default_cpu_threads() == (2, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    machine(None)  # no /proc/loadavg (macOS, Windows)
    assert default_cpu_threads() == (2, "torch's default")


def test_runnable_tasks_are_read_from_proc_loadavg_less_this_process(monkeypatch, tmp_path):
    """The runnable count is the 4th field's numerator: the median of the samples, less this process's thread. The
    1-minute load average (the first field) is not used: it still counts a run that has just ended."""
    readings = iter(["9.50 6.00 3.00 3/800 12345", "9.50 6.00 3.00 1/800 12345", "9.50 6.00 3.00 3/800 12345"] * 3)
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/loadavg":
            loadavg = tmp_path / "loadavg"
            loadavg.write_text(next(readings), encoding="utf-8")
            return real_open(loadavg, *args, **kwargs)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(backends, "RUNNABLE_SAMPLE_SECONDS", 0)
    assert backends.runnable_tasks_besides_this_one() == 2
    monkeypatch.setattr("builtins.open", lambda *args, **kwargs: (_ for _ in ()).throw(FileNotFoundError(args[0])))
    assert backends.runnable_tasks_besides_this_one() is None


def test_upscale_runs_on_the_free_cores_unless_told_and_says_so(machine, tiny_pipeline, tmp_path, monkeypatch, capsys):
    tiny_pipeline.save_pretrained(tmp_path / "model")
    PIL.Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    chosen = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: chosen.append(threads) or real_set(threads))

    def upscale(*extra):
        arguments = ["upscale", str(tmp_path / "in.png"), "--model", str(tmp_path / "model"), "--steps", "1"]
        assert main(arguments + ["--output", str(tmp_path / "out.png"), "--overwrite", *extra]) == 0
        real_set(2)
        return chosen.pop(), capsys.readouterr().err  # a note, as the other notes: stdout lists the outputs

    machine(6)
    threads, printed = upscale()
    assert threads == 1
    assert (
        "1 CPU thread(s): other processes keep the cores busy (6 runnable tasks besides this one on 2 cores); "
        "--threads sets them (a rerun matches bit for bit at the same count)" in printed
    )
    threads, printed = upscale("--threads", "2")  # the user's count, busy or not
    assert threads == 2 and "CPU thread" not in printed
    machine(0)  # idle: torch's count, as before, and nothing said
    threads, printed = upscale()
    assert threads == 2 and "CPU thread" not in printed
