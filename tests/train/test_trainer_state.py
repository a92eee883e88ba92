"""Training checkpoints hold data only: resuming never unpickles, so a crafted checkpoint cannot run code."""

import json
import os
import pickle

import pytest
import torch

from knnmem.train.trainer import Trainer, TrainConfig
from test_train import TINY_RUN


class Payload:
    """Unpickling this runs `os.system`: what a crafted trainer state would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickled_trainer_state_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint" / "trainer_state.pt").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match=r"checkpoint/trainer_state.pt: a checkpoint in the pickle format .* not loaded"):
        Trainer(TrainConfig(**TINY_RUN), tmp_path / "run")
    assert not marker.exists()


def test_checkpoints_hold_no_pickle_and_resume_the_optimiser(tmp_path):
    trainer = Trainer(TrainConfig(**TINY_RUN), tmp_path)
    trainer.train_step()
    trainer.save()
    for file in (tmp_path / "checkpoint").iterdir():
        head = file.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{file.name} looks like a pickle or torch.save archive"
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.95]
    resumed = Trainer(TrainConfig(**TINY_RUN), tmp_path)
    saved, loaded = trainer.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for param, values in saved["state"].items():
        for name, value in values.items():
            assert torch.equal(value, loaded["state"][param][name]), (param, name)
