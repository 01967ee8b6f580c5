import os

import matplotlib
import pytest

matplotlib.use("Agg")
os.environ.setdefault("CONFETI_SMOKE", "1")

import torch  # noqa: E402

# Tests run many tiny ops: one thread avoids oversubscription on the 2-core CI machine.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny ToyStreets (12 + 12 + 4 images of 64x128) written in the official layouts."""
    from confeti.toystreets import write_toystreets

    root = tmp_path_factory.mktemp("toy")
    write_toystreets(
        root,
        n_source=12,
        n_target_train=12,
        n_target_val=4,
        height=64,
        width=128,
        seed=0,
        progress=False,
    )
    return root
