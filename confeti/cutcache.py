"""Phase 0 (standalone CUT pre-training) trained once and reused by every method that uses G.

Phase 0 (``runner.phases``: ``style_pretrain_iters`` calls of ``StyleTransfer.pretrain_step``)
touches G, D, F and their Adam states only, and every random draw of its iteration t is a
function of (seed, rank, t). So ``style``, ``selftrain+style`` and ``confeti`` with the same seed,
data and CUT settings train the same phase 0. ``train(..., cut_cache=DIR)`` stores its result in
``DIR/cut_<key>.pt`` (G/D/F weights, their optimizer states and the per-iteration losses, for
``metrics.jsonl``); a later run with the same key loads it and continues at iteration
``style_pretrain_iters`` bit-for-bit as if it had trained phase 0 itself
(tests/test_cutcache.py).

The key hashes everything phase 0's result depends on: the data folder's real path, every Config
field except those only the segmentor's training reads (``NOT_PHASE0``; a field added later is
in the key until it is listed there), the source of the modules phase 0 runs
(``PHASE0_MODULES``), torch's version, the device type and the thread count (float rounding of
the kernels). Files are written atomically
(``checkpoint.save_atomic``); a lock file (``flock``) lets one process train a key while the
others wait for its result instead of training it too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from . import __version__
from .checkpoint import CheckpointError, load_checkpoint, save_atomic
from .config import Config

FORMAT = 1

# Config fields phase 0 never reads: the segmentor's optimiser and schedule, self-training,
# prototypes and contrast, the joint/two-stage switches, and logging (the metrics rows of phase
# 0 are rebuilt from the stored losses with the run's own log_every and lr). The segmentor's
# shape (backbone, widths, classes, proto_dim) stays in the key: its initialisation draws from
# the RNG before G's does.
NOT_PHASE0 = frozenset(
    {
        "iters",
        "lr",
        "head_lr_mult",
        "weight_decay",
        "warmup_iters",
        "poly_power",
        "ema_alpha",
        "pseudo_threshold",
        "pseudo_ignore_top",
        "pseudo_ignore_bottom",
        "color_jitter_p",
        "color_jitter_strength",
        "blur_p",
        "fd_weight",
        "fd_ratio",
        "proto_momentum",
        "proto_top_k",
        "tau",
        "contrast_samples",
        "contrast_weight",
        "reg_weight",
        "cam_weight",
        "psc_weight",
        "psc_judge",
        "target_contrast",
        "proto_warmup_iters",
        "contrast_start",
        "cam_mix_start",
        "schedule",
        "style_joint",
        "log_every",
        "eval_every",
        "ckpt_every",
        "eval_max_images",
        "num_workers",
    }
)


# the modules phase 0 runs (data, RNG use of the model initialisation, CUT, the loop)
PHASE0_MODULES = (
    "checkpoint.py",
    "config.py",
    "contrast.py",
    "cutcache.py",
    "datasets.py",
    "deeplab.py",
    "labels.py",
    "prototypes.py",
    "runner.py",
    "stylize.py",
    "train.py",
)


def _source_digest() -> str:
    """sha256 of the modules phase 0 runs: a change there never reuses an old phase 0."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for name in PHASE0_MODULES:
        h.update(name.encode() + b"\0" + (root / name).read_bytes())
    return h.hexdigest()


def cache_key(cfg: Config, data, device, threads: int | None = None) -> dict:
    """Everything phase 0's result depends on, as a JSON-able dict (``threads``: of the process
    that trains it; default this one's)."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_PHASE0}
    return {
        "format": FORMAT,
        "data": os.path.realpath(data),
        "config": json.loads(json.dumps(fields)),  # tuples -> lists, as they load back
        "confeti": __version__,
        "source": _source_digest(),
        "torch": str(torch.__version__),
        "device": torch.device(device).type,
        "threads": threads or torch.get_num_threads(),
    }


def _path(cache_dir, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"cut_{digest}.pt"


def cache_path(cache_dir, cfg: Config, data, device, threads: int | None = None) -> Path:
    """The file phase 0 of ``cfg`` on ``data`` is stored in under ``cache_dir``."""
    return _path(cache_dir, cache_key(cfg, data, device, threads))


class Phase0Cache:
    """One key's cache file and its lock. ``acquire`` waits while another process holds the
    key; ``load`` returns the stored phase 0 or None; ``store`` writes it atomically."""

    def __init__(self, cache_dir, cfg: Config, data, device):
        self.key = cache_key(cfg, data, device)
        self.path = _path(cache_dir, self.key)
        self.iters = cfg.style_pretrain_iters
        self.logs: list[dict[str, float]] = []  # per-iteration losses while this run fills it
        self._lock = None

    def acquire(self) -> None:
        """Exclusive lock on ``<file>.lock`` (blocks while another process trains this key)."""
        try:
            import fcntl
        except ImportError:  # no flock (Windows): atomic writes alone, the last complete wins
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path.with_suffix(".lock"), "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except BaseException:
            f.close()
            raise
        self._lock = f

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            ck = load_checkpoint(self.path)
        except CheckpointError:
            return None  # unreadable: train phase 0 again and replace it
        if ck.get("key") != self.key or len(ck.get("logs", ())) != self.iters:
            return None
        return ck

    def store(self, style) -> None:
        """Write G/D/F, their optimizer states and the ``logs`` of every phase-0 iteration."""
        if len(self.logs) != self.iters:
            return  # not trained from iteration 0 in this process: nothing complete to store
        ck = {
            "key": self.key,
            "style": style.state_dict(),
            "style_optim": style.optim_state_dict(),
            "logs": self.logs,
        }
        save_atomic(ck, self.path)
