"""LR schedule and sqrt batch scaling; TrainConfig validation.

    python -m pytest tests/unit/test_train_schedule.py -q
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from metamorph.train.config import TrainConfig
from metamorph.train.schedule import (
    STAGE1_BASE_BATCH,
    STAGE1_BASE_LR,
    cosine_factor,
    sqrt_scaled_lr,
    warmup_cosine_scheduler,
)


def test_sqrt_rule():
    assert sqrt_scaled_lr(448, STAGE1_BASE_BATCH, STAGE1_BASE_LR) == STAGE1_BASE_LR
    assert sqrt_scaled_lr(4 * 448, 448, 1.0) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        sqrt_scaled_lr(0, 448, 1.0)


def test_warmup_then_cosine():
    total, warm = 100, 3
    f = [cosine_factor(s, total, warm) for s in range(total)]
    assert f[0] == pytest.approx(1 / 3) and f[2] == pytest.approx(1.0)  # no step at LR 0
    assert f[3] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[3:], f[4:]))  # monotone decay
    assert f[-1] < 0.001
    assert cosine_factor(total, total, warm, min_ratio=0.1) == pytest.approx(0.1)


def test_scheduler_state_is_json_and_resumes():
    def make():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
        return opt, warmup_cosine_scheduler(opt, 20, 0.1)

    opt, sched = make()
    for _ in range(7):
        opt.step()
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))
    opt2, sched2 = make()
    sched2.load_state_dict(state)
    opt.step(); sched.step(); opt2.step(); sched2.step()
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_config_rejects_bad_values_by_name():
    assert TrainConfig(micro_batch_size=2, grad_accum=3).global_batch_rows(4) == 24
    for bad, key in [({"strategy": "zero3"}, "train.strategy"), ({"keep_last": 0}, "train.keep_last"),
                     ({"warmup_ratio": 1.5}, "train.warmup_ratio"), ({"max_steps": 0, "epochs": math.inf}, "train.epochs")]:
        with pytest.raises(ValueError, match=key):
            TrainConfig(**bad)
