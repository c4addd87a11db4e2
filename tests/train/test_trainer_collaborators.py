"""The trainer is handed its collaborators (issue 24): checkpointing, evaluator, logger.

What it is handed is what it uses: its checkpoints and final weights go through the given
:class:`Checkpointing` (with the ``cfg.json`` fields the caller gave it), the evaluator runs after
every step and logs through the given logger, and a folder the caller claimed stays the caller's
to release.
"""

from __future__ import annotations

import json

import pytest
import torch

from sae.buffer.source import Batch
from sae.eval.quick import PeriodicEval
from sae.models import SAEConfig, build_sae
from sae.train.checkpointing import Checkpointing
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer, run_identity


class RecordingCheckpointing(Checkpointing):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.saved: list[int] = []

    def save(self, step, saes, strategy, trainer_state):
        self.saved.append(step)
        return super().save(step, saes, strategy, trainer_state)


class ListLogger:
    def __init__(self):
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def close(self):
        pass


def make(tmp_path, steps=6, **kw):
    cfg = TrainConfig(batch_size=64, steps=steps, out_dir=str(tmp_path / "run"), checkpoint_every=2, progress=False,
                      eval_every=0, lr=1e-3, log_every=1)
    x = torch.randn(1024, 8, generator=torch.Generator().manual_seed(0))
    return cfg, {"s": build_sae(SAEConfig(num_latents=32, k=4), 8, seed=0)}, x, kw


def test_checkpoints_and_final_weights_go_through_the_checkpointing_it_is_handed(tmp_path):
    cfg, saes, x, _ = make(tmp_path)
    ck = RecordingCheckpointing(tmp_path / "elsewhere", keep=1, sae_meta={"data": {"note": "given"}})
    trainer = Trainer(cfg, saes, x, checkpointing=ck)
    trainer.fit()
    assert ck.saved == [2, 4, 6]
    assert trainer.out_dir == tmp_path / "elsewhere" and not (tmp_path / "run").exists()
    cfg_json = json.loads((trainer.final_dirs["s"] / "cfg.json").read_text())
    assert cfg_json["data"] == {"note": "given"}
    assert len(list((tmp_path / "elsewhere" / "checkpoints").glob("step_*"))) == 1  # keep=1
    assert not ck.claimed  # fit claimed it, so fit released it


def test_a_folder_the_caller_claimed_stays_claimed_and_a_second_run_is_refused(tmp_path):
    cfg, saes, x, _ = make(tmp_path)
    ck = Checkpointing(cfg.out_dir)
    trainer = Trainer(cfg, saes, x, checkpointing=ck)
    ck.claim(run_identity(cfg, saes, trainer.source, trainer.strategy), resume=True, total_steps=cfg.steps)
    trainer.fit()
    assert ck.claimed and ck.folder.locked
    other = Checkpointing(cfg.out_dir)
    with pytest.raises(RuntimeError):
        other.claim(trainer.identity, resume=True, total_steps=cfg.steps)
    ck.release()
    assert not ck.folder.locked


def test_the_evaluator_runs_after_every_step_and_logs_through_the_given_logger(tmp_path):
    cfg, saes, x, _ = make(tmp_path)
    seen: list[int] = []
    periodic = PeriodicEval([Batch(x[:128])], every=3)

    def evaluator(trainer):
        seen.append(trainer.step)
        periodic(trainer)

    logger = ListLogger()
    Trainer(cfg, saes, x, logger=logger, evaluator=evaluator).fit()
    assert seen == [1, 2, 3, 4, 5, 6]
    eval_steps = [step for step, m in logger.rows if "eval/fvu/s" in m]
    assert eval_steps == [3, 6]
