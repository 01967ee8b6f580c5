import os

import matplotlib

matplotlib.use("Agg")
os.environ.setdefault("CONFETI_SMOKE", "1")
