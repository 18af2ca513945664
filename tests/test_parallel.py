"""Several processes for one run: the global batch split, synchronised BatchNorm, every stage kind
on 2 gloo processes against 1 (the same ledger), torchrun and submitit starting the ranks, one
failing or hanging rank, kill -9 and resume, and the bad inputs."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from effitrain.errors import ConfigError, TrainingError
from effitrain.parallel.batches import check_divides, plan_steps, strided

from conftest import TINY, assert_refused, read_summary, run_and_kill, run_cli, run_dirs
from test_seams import write_recipe


# -- the global batch ---------------------------------------------------------------------------


@pytest.mark.parametrize("world,accum", [(1, 1), (1, 4), (2, 1), (2, 2), (4, 2)])
def test_each_step_is_the_one_process_global_batch_split_over_processes(world: int, accum: int) -> None:
    order = list(torch.randperm(203, generator=torch.Generator().manual_seed(1)).tolist())
    plans = [plan_steps(order, 32, rank, world, accum) for rank in range(world)]
    single = [order[start:start + 32] for start in range(0, len(order), 32)]
    assert len({len(plan) for plan in plans}) == 1 and len(plans[0]) == len(single)
    for step, batch in enumerate(single):
        micro = [plan[step] for plan in plans]
        assert len({len(parts) for parts in micro}) == 1  # every process makes the same calls
        assert sorted(index for parts in micro for part in parts for index in part) == sorted(batch)
        assert all(len(parts) == accum for parts in micro[:-1]) or step == len(single) - 1


def test_a_last_batch_smaller_than_the_processes_is_left_out() -> None:
    plans = [plan_steps(list(range(65)), 32, rank, 4, 1) for rank in range(4)]  # 32, 32, then 1 example for 4 processes
    assert [len(plan) for plan in plans] == [2, 2, 2, 2]


def test_validation_parts_cover_the_split_exactly_once() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=4)
    seen = [int(value) for rank in range(3) for (batch,) in strided(loader, rank, 3) for value in batch]
    assert sorted(seen) == list(range(10))


def test_a_batch_that_does_not_split_names_the_sizes_that_would() -> None:
    with pytest.raises(ConfigError, match=r"data.batch_size = 50 does not split into 2 process\(es\) x 2 micro-batch\(es\).*e.g. 48 or 52"):
        check_divides(50, 2, 2, "data.batch_size")


def test_group_batchnorm_matches_batchnorm_over_the_whole_batch(tmp_path: Path) -> None:
    import torch.distributed as dist

    from effitrain.parallel.batchnorm import GroupBatchNorm

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain, synced = nn.BatchNorm2d(3), GroupBatchNorm(3)
        synced.load_state_dict(plain.state_dict())
        inputs = torch.randn(6, 3, 4, 4) * 3 + 1
        a, b = inputs.clone().requires_grad_(), inputs.clone().requires_grad_()
        (plain(a) * torch.arange(3.0).view(1, 3, 1, 1)).sum().backward()
        (synced(b) * torch.arange(3.0).view(1, 3, 1, 1)).sum().backward()
        assert torch.allclose(a.grad, b.grad, atol=1e-5)
        assert torch.allclose(plain.running_var, synced.running_var) and torch.allclose(plain.running_mean, synced.running_mean)
        plain.eval(), synced.eval()
        assert torch.allclose(plain(inputs), synced(inputs), atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_a_failed_process_becomes_one_line() -> None:
    from effitrain.parallel.launch import failure_error

    kept = failure_error(1, {"message": "ConfigError: stage.x: no such layer"})
    assert isinstance(kept, ConfigError) and str(kept) == "stage.x: no such layer"
    crash = failure_error(1, {"message": "RuntimeError: boom"})
    assert isinstance(crash, TrainingError) and str(crash) == "process 1 failed: RuntimeError: boom"
    assert str(failure_error(0, "Signal 9 (SIGKILL) received by PID 7")) == "process 0 failed: Signal 9 (SIGKILL) received by PID 7"


# -- bad input ----------------------------------------------------------------------------------


def _refusal(*overrides: str) -> str:
    from effitrain.cli import precheck

    with pytest.raises(ConfigError) as caught:
        precheck([*TINY, *overrides])
    return str(caught.value)


def test_bad_process_settings_are_refused_before_any_work() -> None:
    import socket

    assert _refusal("trainer.devices=0") == "trainer.devices = 0 is not allowed (allowed: an integer >= 1 (processes, one per GPU on CUDA))"
    assert _refusal("trainer.devices=2", "trainer.dist_backend=nccl") == \
        "trainer.dist_backend = 'nccl' needs CUDA devices; this run is on cpu (allowed here: gloo, auto)"
    assert _refusal("trainer.devices=2", "data.batch_size=33").startswith(
        "data.batch_size = 33 does not split into 2 process(es) x 1 micro-batch(es)")
    assert _refusal("trainer.devices=2", "stage.train.trainer.grad_accum_steps=4", "data.batch_size=36").startswith(
        "data.batch_size = 36 does not split into 2 process(es) x 4 micro-batch(es)")
    assert _refusal("trainer.devices=4", "device=cuda").startswith("device = 'cuda': no CUDA device is available here")
    assert _refusal("trainer.dist_backend=mpi") == "trainer.dist_backend = 'mpi' is not allowed (allowed: auto, gloo, nccl)"
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert _refusal("trainer.devices=2", f"trainer.dist_port={port}") == \
            f"trainer.dist_port = {port}: the port is in use on this machine (allowed: a free port, or null to pick one)"
    assert _refusal("+stage@stage.peers=codistill", "stage.peers.placement=per_rank", "trainer.devices=3") == (
        "stage.peers.placement = 'per_rank' puts each of 2 peers on its own processes, and the run has 3 "
        "(allowed: trainer.devices = a multiple of 2, or placement=together)")


def test_a_bad_process_setting_through_the_cli(workdir: Path) -> None:
    assert_refused(run_cli("run", *TINY, "trainer.devices=2", "data.batch_size=33", cwd=workdir),
                   "data.batch_size = 33 does not split into 2 process(es)", workdir)


# -- every stage kind on 2 processes ------------------------------------------------------------

EVERY_STAGE = """# @package _global_
# Every stage kind, tiny: the same recipe on 1 and on 2 processes gives the same ledger.
defaults:
  - /stage@stage.teacher: train
  - /stage@stage.student: distill
  - /stage@stage.pruned: prune
  - /stage@stage.channels: prune
  - /stage@stage.qat: qat
  - /stage@stage.lowrank: lowrank
  - /stage@stage.cluster: cluster
  - /stage@stage.int8: quantize
  - /stage@stage.peers: codistill
  - /stage@stage.evaluate: evaluate
  - override /data: synthetic
  - override /model: mlp
model: {hidden: [32], dropout: 0.0}
trainer: {max_epochs: 2, log_every_steps: 1}
measure: {repeats: 10, warmup: 1, final_retime: false}
report: false
stage:
  student:
    teachers: [teacher]
    student: {_target_: effitrain.models.mlp.MLP, input_shape: "${data.input_shape}", num_classes: "${data.num_classes}", hidden: [16], dropout: 0.0}
    temperature: 2.0
    alpha: 0.5
    features: [{student: layers.0, teacher: layers.0, loss: mse, weight: 0.1}]
  pruned: {schedule: gradual, saliency: taylor, sparsity: 0.5, frequency: 2, saliency_batches: 2}
  channels: {granularity: structured, sparsity: 0.25}
  qat: {bits: 4, source: channels}
  lowrank: {rank_ratio: 0.5, source: channels}
  cluster: {clusters: 8, fine_tune: true, source: channels}
  int8: {source: channels}
  peers: {burn_in_steps: 4, trainer: {restore_best: false}}
"""


def _step_losses(run_dir: Path) -> dict[str, list[float]]:
    losses = collections.defaultdict(list)
    for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if "lr" in record:
            losses[record["stage"]].append(record["train_loss"])
    return losses


def test_every_stage_kind_on_two_processes_gives_the_one_process_ledger(workdir: Path) -> None:
    searchpath = write_recipe(workdir / "conf", "every_stage", EVERY_STAGE)
    one = run_cli("run", "recipe=every_stage", searchpath, "hydra.run.dir=one", cwd=workdir)
    assert one.returncode == 0, one.stderr
    two = run_cli("run", "recipe=every_stage", searchpath, "hydra.run.dir=two", "trainer.devices=2",
                  "stage.peers.placement=per_rank", cwd=workdir)
    assert two.returncode == 0, two.stderr
    assert "2 processes (gloo, started by effitrain)" in two.stdout
    single, double = read_summary(workdir / "one"), read_summary(workdir / "two")
    assert double["processes"] == 2 and double["status"] == "completed"
    assert [row["name"] for row in single["stages"]] == [row["name"] for row in double["stages"]]
    for a, b in zip(single["stages"], double["stages"]):  # the same models, measured the same
        for key in ("accuracy", "nonzero_params", "params"):
            assert a["metrics"][key] == b["metrics"][key], (a["name"], key)
        assert a["metrics"]["size_bytes"] == pytest.approx(b["metrics"]["size_bytes"], rel=0.01)  # compressed: last digits differ
    peers_one, peers_two = single["stages"][-2]["metrics"], double["stages"][-2]["metrics"]
    assert peers_one["peer_accuracy"] == peers_two["peer_accuracy"] and peers_one["churn"] == peers_two["churn"]
    assert peers_two["placement"] == "per_rank (1 process(es) per peer, exchange: predictions)"
    losses_one, losses_two = _step_losses(workdir / "one"), _step_losses(workdir / "two")
    for stage in ("teacher", "student", "pruned", "channels", "qat", "lowrank", "cluster"):  # the peers log differently by placement
        assert losses_one[stage] == pytest.approx(losses_two[stage], rel=1e-5), stage
    assert sorted(path.name for path in (workdir / "two" / "checkpoints" / "peers").iterdir()) == ["peer0", "peer1"]
    assert not (workdir / "outputs").exists()  # one folder: the one named


def test_synchronised_batchnorm_on_two_processes_matches_one(workdir: Path) -> None:
    settings = ["recipe=baseline", "data=synthetic", "model=cnn", "model.channels=[8,16]", "model.hidden=16", "model.dropout=0",
                "trainer.max_epochs=3", "trainer.sync_batchnorm=true", "measure.repeats=10", "measure.warmup=1", "report=false"]
    for name, devices in (("one", 1), ("two", 2)):
        result = run_cli("run", *settings, f"trainer.devices={devices}", f"hydra.run.dir={name}", cwd=workdir)
        assert result.returncode == 0, result.stderr
    one, two = read_summary(workdir / "one"), read_summary(workdir / "two")
    examples = len(json.loads((workdir / "one" / "predictions" / "train.json").read_text())["labels"])
    assert abs(one["stages"][0]["metrics"]["accuracy"] - two["stages"][0]["metrics"]["accuracy"]) <= 1 / examples + 1e-12


# -- the ways processes start -------------------------------------------------------------------


def _processes_in(folder: Path) -> list[int]:
    """Processes (other than this one) whose working directory is `folder`: a run's launcher and workers."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if Path(os.readlink(entry / "cwd")) == folder.resolve():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_makes_one_run_folder(workdir: Path) -> None:
    result = subprocess.run(["torchrun", "--nproc_per_node=2", "-m", "effitrain", "run", *TINY], cwd=workdir, capture_output=True,
                            text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = run_dirs(workdir)
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["processes"] == 2 and summary["launcher"] == "torchrun"
    assert result.stdout.count("completed") == 1  # rank 0 alone prints the ledger


def test_submitit_local_sweep_with_two_tasks_per_job(workdir: Path) -> None:
    result = run_cli("run", "-m", *TINY, "seed=1,2", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                     "hydra.sweep.dir=sweep", cwd=workdir)
    assert result.returncode == 0, result.stderr
    for job in ("0", "1"):
        summary = read_summary(workdir / "sweep" / job)
        assert summary["status"] == "completed" and summary["processes"] == 2 and summary["launcher"] == "submitit"
    assert json.loads((workdir / "sweep" / "1" / "summary.json").read_text())["seed"] == 2


@pytest.mark.parametrize("how,message", [
    ("error", "error: stage.fault: process 1 refuses on purpose"),
    ("hang", "error: waited trainer.dist_timeout_s = 5 s for the other processes of the run, which stopped answering"),
])
def test_one_failing_process_stops_the_run_in_bounded_time(workdir: Path, how: str, message: str) -> None:
    started = time.time()
    result = run_cli("run", *TINY, "trainer.max_epochs=1", "trainer.devices=2", "trainer.dist_timeout_s=5",
                     f"+stage.fault={{_target_: userplugins.Fault, how: {how}}}", cwd=workdir, user_code=True)
    assert time.time() - started < 90
    assert result.returncode == 2 and result.stderr.strip().startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    (run_dir,) = run_dirs(workdir)
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and message[len("error: "):] in summary["error"]
    assert [row["name"] for row in summary["stages"]] == ["train", "evaluate"]  # what completed before stays
    time.sleep(1)
    assert not _processes_in(workdir)


def test_kill_9_of_the_launcher_then_resume_matches_an_uninterrupted_run(workdir: Path) -> None:
    settings = [*TINY, "trainer.max_epochs=6", "data.num_samples=1500", "model.hidden=[64]", "model.dropout=0", "trainer.devices=2",
                "measure.final_retime=false"]
    assert run_cli("run", *settings, "hydra.run.dir=full", cwd=workdir).returncode == 0
    run_and_kill(["run", *settings, "hydra.run.dir=killed"], workdir, workdir / "killed" / "checkpoints" / "train" / "last_state.pt")
    time.sleep(1)
    assert not _processes_in(workdir)  # the workers died with their launcher
    assert read_summary(workdir / "killed")["status"] == "running"
    result = run_cli("resume", str(workdir / "killed"), cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "resumed after epoch" in result.stdout
    full, resumed = read_summary(workdir / "full"), read_summary(workdir / "killed")
    assert resumed["status"] == "completed" and resumed["processes"] == 2
    for a, b in zip(full["stages"], resumed["stages"]):
        assert a["metrics"]["accuracy"] == b["metrics"]["accuracy"]
        assert a["metrics"]["loss"] == pytest.approx(b["metrics"]["loss"], rel=1e-6)
