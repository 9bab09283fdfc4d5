"""The GPU launcher's pure parts: reading nvidia-smi (a fake one on PATH), choosing GPUs
from ``--gpus``, the children's environments and command lines, the restart policy; and
the supervisor on trivial children (a crash is restarted, then given up on)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.settings import load_settings
from workers.launcher import (
    Child,
    Gpu,
    RestartPolicy,
    Supervisor,
    children_for,
    list_gpus,
    parse_nvidia_smi,
    plan,
    select_gpus,
)

FOUR_GPUS = """\
0, NVIDIA H100 80GB HBM3, 81559 MiB
1, NVIDIA H100 80GB HBM3, 81559 MiB
2, NVIDIA L4, 23034 MiB
3, NVIDIA L4, 23034 MiB
"""


def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stdout: str,
                    exit_code: int = 0) -> Path:
    """An executable ``nvidia-smi`` first on PATH that prints ``stdout``, exits ``exit_code``
    and records its arguments."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (tmp_path / "out.txt").write_text(stdout)
    script = bindir / "nvidia-smi"
    script.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args.txt\n'
                      f"cat {tmp_path}/out.txt\nexit {exit_code}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    return tmp_path / "args.txt"


def test_lists_the_gpus_nvidia_smi_reports(tmp_path, monkeypatch) -> None:
    args = fake_nvidia_smi(tmp_path, monkeypatch, FOUR_GPUS)
    gpus = list_gpus()
    assert [g.index for g in gpus] == [0, 1, 2, 3]
    assert gpus[2] == Gpu(2, "NVIDIA L4", "23034 MiB")
    assert args.read_text().split() == ["--query-gpu=index,name,memory.total",
                                        "--format=csv,noheader"]


def test_no_nvidia_smi_means_no_gpus(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvidia-smi
    assert list_gpus() == []


def test_a_failing_nvidia_smi_means_no_gpus(tmp_path, monkeypatch, caplog) -> None:
    fake_nvidia_smi(tmp_path, monkeypatch, "NVIDIA-SMI has failed because it couldn't "
                    "communicate with the NVIDIA driver.", exit_code=9)
    with caplog.at_level(logging.WARNING):
        assert list_gpus() == []
    assert "exited with 9" in caplog.text and "couldn't communicate" in caplog.text


def test_unreadable_lines_are_skipped() -> None:
    assert parse_nvidia_smi("\nNo devices were found\n1, Tesla T4, 15360 MiB\n") == \
        [Gpu(1, "Tesla T4", "15360 MiB")]


@pytest.mark.parametrize(("spec", "chosen"), [
    ("all", [0, 1, 2, 3]), ("ALL", [0, 1, 2, 3]), ("none", []), ("0,2", [0, 2]),
    (" 3 , 1 ", [3, 1]), ("2", [2]),
])
def test_gpus_option_picks_gpus(spec: str, chosen: list[int]) -> None:
    assert [g.index for g in select_gpus(spec, parse_nvidia_smi(FOUR_GPUS))] == chosen


def test_all_on_a_host_without_gpus_is_no_gpu() -> None:
    assert select_gpus("all", []) == []


@pytest.mark.parametrize(("spec", "message"), [
    ("0,5", "GPU 5 is not on this host (nvidia-smi lists: 0, 1, 2, 3)"),
    ("1,1", "GPU 1 is named twice"),
    ("0,,2", "'' is not a GPU index"),
    ("gpu0", "'gpu0' is not a GPU index"),
    ("-1", "'-1' is not a GPU index"),
])
def test_bad_gpus_option_says_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match="--gpus: " + message.replace("(", r"\(")
                       .replace(")", r"\)")):
        select_gpus(spec, parse_nvidia_smi(FOUR_GPUS))


def test_gpu_children_are_pinned_each_to_its_gpu() -> None:
    gpus = select_gpus("1,3", parse_nvidia_smi(FOUR_GPUS))
    children = plan(gpus, processes=1, worker_args=["--models", "digits,minilm"],
                    environ={}, cores=16, metrics_port=9100)
    assert [c.label for c in children] == ["gpu1", "gpu3"]
    for child, index, port in zip(children, ("1", "3"), ("9100", "9101"), strict=True):
        assert child.env == {"CUDA_VISIBLE_DEVICES": index, "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                             "INFERQ_DEVICE": "cuda:0", "INFERQ_ORT_THREADS": "8",
                             "INFERQ_METRICS_PORT": port}
        assert child.argv == (sys.executable, "-P", "-m", "cli.main", "worker", "--models",
                              "digits,minilm", "--hostname", f"gpu{index}@%h")


def test_cpu_children_share_the_cores() -> None:
    children = plan([], processes=3, worker_args=[], environ={}, cores=8)
    assert [c.label for c in children] == ["cpu0", "cpu1", "cpu2"]
    assert [c.argv[-1] for c in children] == ["cpu0@%h", "cpu1@%h", "cpu2@%h"]
    for child in children:
        # No metrics port unless asked; CPU workers never see a GPU.
        assert child.env == {"CUDA_VISIBLE_DEVICES": "", "INFERQ_DEVICE": "cpu",
                             "INFERQ_ORT_THREADS": "2"}
    assert int(children[0].env["INFERQ_ORT_THREADS"]) * 3 <= 8


@pytest.mark.parametrize(("cores", "processes", "threads"), [(2, 2, 1), (2, 1, 2), (2, 5, 1),
                                                             (16, 3, 5)])
def test_ort_threads_times_processes_fit_the_cores(cores, processes, threads) -> None:
    children = plan([], processes=processes, worker_args=[], environ={}, cores=cores)
    assert {c.env["INFERQ_ORT_THREADS"] for c in children} == {str(threads)}


def test_ort_threads_the_user_set_are_kept() -> None:
    children = plan([], processes=2, worker_args=[], environ={"INFERQ_ORT_THREADS": "4"},
                    cores=2)
    assert all("INFERQ_ORT_THREADS" not in c.env for c in children)  # inherited as set


def test_metrics_ports_must_fit() -> None:
    with pytest.raises(ConfigError, match="INFERQ_METRICS_PORT"):
        plan([], processes=2, worker_args=[], environ={}, cores=2, metrics_port=65535)


def test_children_for_passes_the_worker_options_on(tmp_path, monkeypatch) -> None:
    fake_nvidia_smi(tmp_path, monkeypatch, FOUR_GPUS)
    monkeypatch.delenv("INFERQ_ORT_THREADS", raising=False)
    settings = load_settings(broker_url="redis://127.0.0.1:6379/0", metrics_port=9200)
    children = children_for("0,2", settings, models="digits", concurrency=4,
                            hostname="gpu@box7", processes=3, log_level="DEBUG")
    assert [c.argv[4:] for c in children] == [
        ("worker", "--log-level", "DEBUG", "--models", "digits", "--concurrency", "4",
         "--hostname", f"gpu{i}@box7") for i in (0, 2)]
    assert [c.env["INFERQ_METRICS_PORT"] for c in children] == ["9200", "9201"]
    cpu = children_for("none", settings, processes=2)
    assert [c.label for c in cpu] == ["cpu0", "cpu1"]


def test_children_for_falls_back_to_cpu_without_gpus(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    settings = load_settings(broker_url="redis://127.0.0.1:6379/0")
    assert [c.label for c in children_for("all", settings)] == ["cpu0"]
    with pytest.raises(ConfigError, match="GPU 0 is not on this host"):
        children_for("0", settings)


def test_restart_backoff_doubles_then_gives_up() -> None:
    policy = RestartPolicy()
    restarts: list[float] = []
    delays = []
    now = 1000.0
    while (delay := policy.delay(restarts, now)) is not None:
        delays.append(delay)
        restarts.append(now)
        now += delay + 5  # it ran 5 s, then failed again
    assert delays == [1, 2, 4, 8, 16]  # 5 restarts within 10 minutes, then give up


def test_restart_backoff_is_capped_and_forgets_old_failures() -> None:
    policy = RestartPolicy(max_restarts=10)
    assert policy.delay([0.0] * 6, 10.0) == 30  # 1 s doubling, but never over 30 s
    assert RestartPolicy().delay([0.0] * 5, 599.0) is None  # 5 restarts in the window
    assert RestartPolicy().delay([0.0] * 5, 600.0) == 1  # they left the window: fresh start
    assert RestartPolicy().delay([0.0, 0.0, 0.0, 590.0], 700.0) == 2  # one still counts


def _child(label: str, code: str) -> Child:
    return Child(label, Gpu(int(label[-1])), (sys.executable, "-c", code), {})


def test_supervisor_restarts_a_failing_child_then_gives_up_naming_the_gpu(caplog) -> None:
    policy = RestartPolicy(first_delay=0.01, max_delay=0.05, max_restarts=2)
    crashing = _child("gpu1", "raise SystemExit(3)")
    finishing = _child("gpu0", "pass")
    with caplog.at_level(logging.INFO, logger="workers.launcher"):
        assert Supervisor([finishing, crashing], policy).run() == 1
    lines = [r.getMessage() for r in caplog.records]
    assert sum("started gpu1 (GPU 1) pid" in line for line in lines) == 3  # 1 + 2 restarts
    assert sum("started gpu0 (GPU 0) pid" in line for line in lines) == 1  # exit 0: done
    assert any("gpu0 (GPU 0) pid" in line and "exited with code 0" in line
               and "not restarted" in line for line in lines)
    assert any("exited with code 3" in line and "restarting in" in line for line in lines)
    assert "gpu1 (GPU 1) failed 3 times within 600 s; giving up" in lines[-1]


def test_supervisor_exits_0_when_every_child_exits_0() -> None:
    assert Supervisor([_child("gpu0", "pass"), _child("gpu1", "pass")]).run() == 0
