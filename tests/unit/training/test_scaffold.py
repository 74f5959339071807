"""The scaffolding every training stage shares, without a Ray cluster: the learning-rate schedule, the
optimizer step, what ends a step (metrics, report, checkpoint) and the refusal to overwrite a run."""

import dataclasses
from pathlib import Path

import pytest
import torch

from trimodal.config import load_config
from trimodal.training import scaffold
from trimodal.training.checkpoint import TrainState
from trimodal.training.metrics import MetricsLog
from trimodal.training.scaffold import RunExistsError, StepReporter, check_resume, lr_lambda, lr_lambdas
from trimodal.training.step import optimizer_step


def test_lr_warms_up_then_decays_to_a_tenth():
    stage = dataclasses.replace(load_config("test").stage1, steps=100, warmup_steps=10)
    f = lr_lambda(stage)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


@pytest.mark.parametrize("lora_steps", [0, 30])
def test_the_adapters_schedule_stops_at_lora_steps_and_the_projectors_runs_on(lora_steps):
    stage = dataclasses.replace(load_config("test").stage2, steps=100, warmup_steps=10, lora_steps=lora_steps)
    projector, adapters = lr_lambdas(stage, 2)
    assert [projector(s) for s in range(101)] == [lr_lambda(stage)(s) for s in range(101)]
    stop = lora_steps or 101
    assert [adapters(s) for s in range(stop)] == [projector(s) for s in range(stop)]
    assert all(adapters(s) == 0.0 for s in range(stop, 101))
    assert len(lr_lambdas(stage, 1)) == 1  # stage 1: the projector alone


def test_optimizer_step_clips_the_gradient_and_steps_the_schedule():
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    loss = optimizer_step((weight * torch.tensor([30.0, 40.0, 0.0])).sum(), [weight], optimizer, scheduler)
    assert loss == 0.0
    assert torch.allclose(weight.detach(), torch.tensor([-0.3, -0.4, 0.0]))  # gradient norm 50 clipped to 1, lr 0.5
    assert scheduler.last_epoch == 1


def test_step_reporter_logs_rates_and_checkpoints_on_schedule(tmp_path: Path, monkeypatch):
    stage = dataclasses.replace(load_config("test").stage1, steps=4, log_every=2, checkpoint_every=3)
    reports, events = [], []
    monkeypatch.setattr(scaffold, "report", lambda metrics, ckpt, save: (reports.append((metrics["step"], ckpt)),
                                                                          events.append("report")))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    reporter = StepReporter(stage, MetricsLog(tmp_path), torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                            save=lambda directory: None)
    state = TrainState(step=0, epoch=1)
    for index in range(4):
        metrics = reporter.finish(state, index + 5, 0.5, started=0.0, counts={"tokens": 10, "images": 2},
                                  extra={"target_tokens": 3}, before_report=lambda: events.append("before"))
    assert list(metrics) == ["step", "loss", "lr", "step_time_s", "tokens_per_s", "images_per_s", "target_tokens",
                             "epoch"]
    assert metrics["tokens_per_s"] == pytest.approx(10 / metrics["step_time_s"])
    assert (state.step, state.epoch, state.batch_in_epoch) == (4, 1, 9)
    assert reports == [(2, False), (3, True), (4, True)]  # every log_every, every checkpoint_every and the last
    assert events[:2] == ["before", "before"] and events[2] == "report"
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]  # plot published, no scratch


def test_check_resume_refuses_a_run_with_checkpoints(tmp_path: Path):
    (tmp_path / "train" / "checkpoint_000000").mkdir(parents=True)
    with pytest.raises(RunExistsError, match="--resume"):
        check_resume(tmp_path, resume=False)
    (tmp_path / "final").mkdir()
    check_resume(tmp_path, resume=True)
    assert (tmp_path / "final").is_dir()


def test_the_process_group_needs_nccl_only_where_torch_has_it():
    """Ray Train would start NCCL for any GPU worker; a torch build without NCCL (a CPU build on a node that was
    granted a GPU) trains over Gloo instead."""
    import torch.distributed as dist

    from trimodal.config import StageConfig
    from trimodal.training.scaffold import torch_config

    gpu = torch_config(StageConfig(use_gpu=True)).backend
    assert gpu == ("cpu:gloo,cuda:nccl" if dist.is_nccl_available() else "gloo")
    assert torch_config(StageConfig(use_gpu=False)).backend == "gloo"
