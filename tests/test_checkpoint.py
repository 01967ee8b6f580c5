import os
import pickle

import pytest
import torch

from confeti.checkpoint import CheckpointError, load_checkpoint, load_state_checked, save_atomic


def test_atomic_save_roundtrip_and_no_temp_left(tmp_path):
    p = tmp_path / "c.pt"
    save_atomic({"w": torch.ones(3)}, p)
    assert torch.equal(load_checkpoint(p)["w"], torch.ones(3))
    assert [f.name for f in tmp_path.iterdir()] == ["c.pt"]


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path):
    p = tmp_path / "c.pt"
    save_atomic({"w": torch.zeros(2)}, p)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk died")

    with pytest.raises(RuntimeError):
        save_atomic({"w": Boom()}, p)
    assert torch.equal(load_checkpoint(p)["w"], torch.zeros(2))
    assert [f.name for f in tmp_path.iterdir()] == ["c.pt"]


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    p = tmp_path / "c.pt"
    save_atomic({"w": torch.randn(100)}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="c.pt"):
        load_checkpoint(p)


def test_code_executing_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CheckpointError):
        load_checkpoint(p)
    assert not marker.exists()


def test_mismatch_lists_keys_and_shapes():
    a, b = torch.nn.Linear(4, 19), torch.nn.Linear(4, 16)
    with pytest.raises(CheckpointError, match=r"weight: checkpoint \(16, 4\) vs model \(19, 4\)"):
        load_state_checked(a, b.state_dict(), "model")
