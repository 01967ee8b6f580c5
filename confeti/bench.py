"""``python -m confeti bench --preset P``: speed, memory and utilisation of one training iteration.

For each method: seconds per iteration (median of ``repeats`` after one warm-up), images/s
(source + target crops), peak memory (CPU: the process's max RSS so far; GPU: max allocated), and
for CONFETI the split of one iteration into phases (``train._mark``). Utilisation = achieved
FLOP/s of the iteration (``torch.utils.flop_counter``) / a large matmul's FLOP/s at the same dtype.
Synthetic batches (random images, random blocky labels) so no data set is needed.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections import defaultdict

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import Config
from .runner import resolve_device
from .train import TrainState, setup_device, train_step

BENCH_METHODS = ("source_only", "style", "contrast", "selftrain", "confeti")


def synthetic_batch(cfg: Config, device, seed: int = 0) -> dict:
    """Random images and piecewise-constant labels with every class, at the crop size."""
    g = torch.Generator().manual_seed(seed)
    b, (h, w) = cfg.batch_size, cfg.crop_size
    coarse = torch.randint(cfg.num_classes, (b, 1, max(h // 8, 1), max(w // 8, 1)), generator=g)
    labels = torch.nn.functional.interpolate(coarse.float(), size=(h, w), mode="nearest")[:, 0]
    return {
        "x_s": torch.randn(b, 3, h, w, generator=g).to(device),
        "y_s": labels.long().to(device),
        "x_t": torch.randn(b, 3, h, w, generator=g).to(device),
        "y_t": labels.long().flip(-1).to(device),
    }


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype=torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n matmul: the machine's practical peak at ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


class PhaseClock:
    """Accumulates wall time between ``train._mark`` calls, per phase name."""

    def __init__(self, device):
        self.device, self.totals = device, defaultdict(float)
        self.reset()

    def reset(self):
        _sync(self.device)
        self.last = time.perf_counter()

    def __call__(self, phase: str):
        _sync(self.device)
        now = time.perf_counter()
        self.totals[phase] += now - self.last
        self.last = now


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_method(cfg: Config, method: str, device, repeats: int = 5) -> dict:
    """Time ``train_step`` after the warm-up gates (t past every gate, so every loss runs)."""
    torch.manual_seed(cfg.seed)
    state = TrainState(cfg, method, device)
    amp = setup_device(state, cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batch = synthetic_batch(cfg, device)
    t = max(cfg.contrast_start, cfg.proto_warmup_iters, cfg.cam_mix_start) + 1
    train_step(state, batch, t, amp=amp)  # warm-up; also fills the prototypes
    times = []
    clock = PhaseClock(device)
    for i in range(repeats):
        clock.reset()
        state.clock = clock if method == "confeti" else None
        t0 = time.perf_counter()
        train_step(state, batch, t + 1 + i, amp=amp)
        _sync(device)
        times.append(time.perf_counter() - t0)
    state.clock = None
    sec = statistics.median(times)
    with FlopCounterMode(display=False) as fc:
        train_step(state, batch, t + 1 + repeats, amp=amp)
    flops = fc.get_total_flops()
    out = {
        "sec_per_iter": round(sec, 4),
        "images_per_sec": round(2 * cfg.batch_size / sec, 2),
        "peak_memory_mb": round(_peak_mb(device), 1),
        "gflop_per_iter": round(flops / 1e9, 2),
        "achieved_gflops": round(flops / sec / 1e9, 2),
    }
    if method == "confeti":
        out["phases_sec"] = {k: round(v / repeats, 4) for k, v in clock.totals.items()}
    return out


def run_bench(cfg: Config, device=None, repeats: int = 5, methods=None) -> dict:
    device = resolve_device(device)
    dtype = torch.float32
    if device.type == "cuda" and cfg.amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    peak = matmul_peak(device, dtype)
    res = {
        "preset": cfg.preset,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "batch_size": cfg.batch_size,
        "crop_size": list(cfg.crop_size),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "methods": {},
    }
    for m in methods or BENCH_METHODS:
        r = bench_method(cfg, m, device, repeats)
        r["utilisation"] = round(r["achieved_gflops"] * 1e9 / peak, 3)
        res["methods"][m] = r
    return res
