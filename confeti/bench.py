"""``python -m confeti bench --preset P``: speed, memory and utilisation of one training iteration.

For each method: seconds per iteration (median of ``repeats`` after three warm-up iterations),
images/s (source + target crops), peak memory (CPU: the process's max RSS so far; GPU: max
allocated), and the split of one iteration into phases (``train._mark``, mean seconds); the
standalone CUT iteration the same way (``cut_iteration``), with the time of a run's phase 0
(``style_pretrain_iters`` of them, trained once per seed with ``--cut-cache``).
Utilisation = achieved FLOP/s of the iteration (``torch.utils.flop_counter``) / the machine's
peak at the same dtype, the faster of a large matmul and a large convolution (on AMD CPUs
oneDNN's convolutions run about twice as fast as MKL's matmul, so the matmul alone would
flatter the utilisation).
Synthetic batches (random images, random blocky labels) so no data set is needed; with ``data``
the loader (readers, crops, augmentation, RCS) is timed too, to compare with the model's images/s.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections import defaultdict

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import Config
from .runner import resolve_device, to_device
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


def _times(fn, device, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (GPU synced)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak(device, dtype=torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n matmul: the machine's practical peak at ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / min(_times(lambda: a @ b, device, repeats))


def conv_peak(device, dtype=torch.float32, channels: int = 512, size: int = 32, repeats=5):
    """FLOP/s of a large 3x3 convolution (batch 8, ``channels`` in and out, size x size)."""
    x = torch.randn(8, channels, size, size, device=device, dtype=dtype)
    w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype)
    sec = min(_times(lambda: torch.nn.functional.conv2d(x, w, padding=1), device, repeats))
    return 2 * 8 * size * size * channels * channels * 9 / sec


def bench_loader(cfg: Config, data_root, batches: int = 20) -> dict:
    """Images/s of the training input pipeline alone (``runner.BatchStream``, real files).

    Counts source + target crops per batch like the model's images/s; the first batch (worker
    start-up) is not timed. With ``num_workers > 0`` loading overlaps the model's work, so the
    loader keeps up when its images/s exceed the model's; with ``num_workers=0`` (the toy) its
    time adds to every iteration's. The same batches are drawn twice: the first pass decodes the
    files, the second reads the in-memory cache of resized pairs (``datasets.CACHE_BYTES``;
    ``cached: false`` where a split is too large for it), what a long run sees once every image
    has been drawn.
    """
    from .runner import BatchStream, build_data

    data = build_data(cfg, data_root, "confeti")

    def pass_sec() -> float:
        stream = iter(BatchStream(data, cfg, 0, batches + 1, rank=0, oracle=False))
        next(stream)
        t0 = time.perf_counter()
        n = sum(1 for _ in stream)
        return (time.perf_counter() - t0) / max(n, 1)

    cold, warm = pass_sec(), pass_sec()
    return {
        "num_workers": cfg.num_workers,
        "sec_per_batch": round(cold, 4),
        "images_per_sec": round(2 * cfg.batch_size / cold, 2),
        "cached": data.source._cache is not None and data.target._cache is not None,
        "sec_per_batch_cached": round(warm, 4),
        "images_per_sec_cached": round(2 * cfg.batch_size / warm, 2),
    }


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
    batch = to_device(synthetic_batch(cfg, device), device, cfg.channels_last)
    t = max(cfg.contrast_start, cfg.proto_warmup_iters, cfg.cam_mix_start) + 1
    for i in range(3):  # warm-up (oneDNN primitive caches, allocator); fills the prototypes
        train_step(state, batch, t + i, amp=amp)
    times = []
    clock = PhaseClock(device)
    for i in range(repeats):
        clock.reset()
        state.clock = clock
        t0 = time.perf_counter()
        train_step(state, batch, t + 3 + i, amp=amp)
        _sync(device)
        times.append(time.perf_counter() - t0)
    state.clock = None
    sec = statistics.median(times)
    with FlopCounterMode(display=False) as fc:
        train_step(state, batch, t + 3 + repeats, amp=amp)
    flops = fc.get_total_flops()
    out = {
        "sec_per_iter": round(sec, 4),
        "images_per_sec": round(2 * cfg.batch_size / sec, 2),
        "peak_memory_mb": round(_peak_mb(device), 1),
        "gflop_per_iter": round(flops / 1e9, 2),
        "achieved_gflops": round(flops / sec / 1e9, 2),
    }
    out["phases_sec"] = {k: round(v / repeats, 4) for k, v in clock.totals.items()}
    return out


def bench_cut(cfg: Config, device, repeats: int = 5) -> dict:
    """One standalone CUT iteration (``StyleTransfer.pretrain_step``: translate, D, G + F):
    the pixel-alignment module's own speed and FLOP/s, apart from the segmentor."""
    torch.manual_seed(cfg.seed)
    state = TrainState(cfg, "style", device)
    setup_device(state, cfg, device)
    batch = to_device(synthetic_batch(cfg, device), device, cfg.channels_last)
    x_s, x_t = batch["x_s"], batch["x_t"]
    times = _times(lambda: state.style.pretrain_step(x_s, x_t), device, repeats, warmup=3)
    with FlopCounterMode(display=False) as fc:
        state.style.pretrain_step(x_s, x_t)
    sec = statistics.median(times)
    return {
        "sec_per_iter": round(sec, 4),
        "gflop_per_iter": round(fc.get_total_flops() / 1e9, 2),
        "achieved_gflops": round(fc.get_total_flops() / sec / 1e9, 2),
        "style_pretrain_iters": cfg.style_pretrain_iters,
        "phase0_sec": round(sec * cfg.style_pretrain_iters, 1),  # once per seed with a cut cache
    }


def run_bench(cfg: Config, device=None, repeats: int = 5, methods=None, data=None) -> dict:
    device = resolve_device(device)
    dtype = torch.float32
    if device.type == "cuda" and cfg.amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    mm, cv = matmul_peak(device, dtype), conv_peak(device, dtype)
    peak = max(mm, cv)
    res = {
        "preset": cfg.preset,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "batch_size": cfg.batch_size,
        "crop_size": list(cfg.crop_size),
        "matmul_peak_gflops": round(mm / 1e9, 1),
        "conv_peak_gflops": round(cv / 1e9, 1),
        "peak_gflops": round(peak / 1e9, 1),
        "channels_last": cfg.channels_last,
        "methods": {},
    }
    for m in methods or BENCH_METHODS:
        r = bench_method(cfg, m, device, repeats)
        r["utilisation"] = round(r["achieved_gflops"] * 1e9 / peak, 3)
        res["methods"][m] = r
    if any(m in ("style", "confeti") for m in res["methods"]):
        cut = res["cut_iteration"] = bench_cut(cfg, device, repeats)
        cut["utilisation"] = round(cut["achieved_gflops"] * 1e9 / peak, 3)
    if data is not None:
        res["loader"] = bench_loader(cfg, data)
        slowest = min(r["images_per_sec"] for r in res["methods"].values())
        res["loader"]["vs_slowest_method"] = round(res["loader"]["images_per_sec"] / slowest, 2)
    return res
