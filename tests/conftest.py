import os

import matplotlib

matplotlib.use("Agg")
os.environ.setdefault("CONFETI_SMOKE", "1")

import torch  # noqa: E402

# Tests run many tiny ops: one thread avoids oversubscription on the 2-core CI machine.
torch.set_num_threads(1)
