"""``python -m confeti gpu-check --out DIR [--tiny]``: one prepared check of the GPU path.

On a CUDA machine, in a few minutes, with synthetic data written in the official folder layouts
(ToyStreets under ``DIR/data``), at the paper preset (DeepLabV2-R101, ``pretrained=None`` so
nothing is downloaded, 512x512 crops, batch 2; the frozen ImageNet copy of the feature distance
is held with random weights, as ``memory.build_state`` does), one function per check:

- ``check_precision``: a few ``train_step`` iterations in bf16 (only with bf16 tensor cores,
  ``train.bf16_native``) and in fp16 + GradScaler: every loss finite, seconds per iteration,
  peak memory per phase (``torch.cuda.max_memory_allocated``, reset at each ``state.clock``);
- ``check_agreement``: the first iteration's losses of each low precision against fp32 (TF32 off)
  from the same seed and batch: ``|low - fp32| <= ATOL + RTOL * |fp32|`` for every loss;
- ``check_estimate``: the ``memory.trace_step`` estimate on the same device, against the measured
  per-phase peaks (what the estimate misses: cuDNN workspace, allocator rounding);
- ``check_fit``: the fp16 step (what an 11 GB card, without bf16 tensor cores, runs) under
  ``torch.cuda.set_per_process_memory_fraction((11,019 MiB - context) / total)``; an OOM says no;
- ``check_loader``: the input pipeline's images/s (``bench.bench_loader``) against the model's;
- ``check_nccl``: with 2+ GPUs a 2-process ``torchrun --standalone`` run (NCCL), whose ranks must
  end with equal weights; otherwise it says that NCCL is untested (gloo covers the logic on CPU,
  tests/test_runner.py).

Everything lands in ``DIR/gpu_check.json``. Without CUDA, ``--tiny`` runs the same code at the
smoke preset's size (fp32 and bf16 CPU autocast; memory per phase from ``memory.LiveBytes``,
the estimate's own instrument): tests/test_gpucheck.py runs it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from .config import Config, paper, smoke
from .memory import (
    CARD_11GB_MB,
    GPU_ASSUMPTIONS,
    MB,
    LiveBytes,
    build_state,
    late_iteration,
    static_tensors,
    trace_step,
)

RTOL, ATOL = 0.05, 0.02  # bf16/fp16 vs fp32, first iteration: |low - fp32| <= ATOL + RTOL |fp32|
# an 11 GB card (RTX 2080 Ti: 11,019 MiB; GTX 1080 Ti: 11,178): no bf16 tensor cores, so fp16
CARD_MB = CARD_11GB_MB


def check_config(tiny: bool) -> Config:
    """The paper preset as the check runs it (``pretrained=None``, 512x512, batch 2) or, tiny,
    the smoke preset (a tiny backbone and 32x64 crops)."""
    if tiny:
        return dataclasses.replace(smoke(), num_workers=0)
    return dataclasses.replace(paper(), pretrained=None, crop_size=(512, 512), batch_size=2)


def write_data(out: Path, tiny: bool) -> Path:
    """ToyStreets in the GTA5 / Cityscapes layouts under ``out/data`` (Cityscapes-sized frames
    for the paper preset, so the loader decodes and resizes what a real run does)."""
    from .toystreets import write_toystreets

    root = out / "data"
    h, w, n = (64, 128, 6) if tiny else (1024, 2048, 16)
    write_toystreets(root, n_source=n, n_target_train=n, n_target_val=2, height=h, width=w,
                     seed=0, progress=False)  # fmt: skip
    return root


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PhasePeaks:
    """``state.clock``: the peak memory of each phase of ``train_step`` in MiB, the most over the
    iterations since ``restart``. CUDA: ``max_memory_allocated``, reset at each phase end. CPU:
    ``memory.LiveBytes`` (enter ``self.context()`` around the iterations)."""

    def __init__(self, device: torch.device, state, batch: dict):
        self.device, self.peaks, self.phase = device, {}, None
        self.mode = None
        if device.type == "cuda":
            self.source = "torch.cuda.max_memory_allocated (reset at each phase end)"
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            self.source = "memory.LiveBytes (no CUDA: the estimate's own instrument)"
            self.mode = LiveBytes()
            for kind, tensors in static_tensors(state, batch).items():
                self.mode.add_static(tensors, kind)
            self.mode.ignore_existing()

    def context(self):
        return self.mode if self.mode is not None else nullcontext()

    def restart(self) -> None:
        self.peaks = {}

    def __call__(self, phase: str) -> None:
        if self.mode is not None:
            peak = self.mode.phase_peak
            self.mode.mark(phase)
        else:
            _sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.peaks[phase] = max(self.peaks.get(phase, 0.0), round(peak / MB, 1))
        self.phase = phase

    def close(self) -> None:
        if self.mode is not None:
            self.mode.close()


def _batch(cfg: Config, device: torch.device) -> dict:
    from .bench import synthetic_batch
    from .runner import to_device

    return to_device(synthetic_batch(cfg, device), device, cfg.channels_last)


def _fp32_exact(device: torch.device):
    """fp32 as fp32: TF32 off for cuDNN convolutions and cuBLAS matmuls (restored after)."""
    if device.type != "cuda":
        return nullcontext()

    class _NoTF32:
        def __enter__(self):
            self.old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

        def __exit__(self, *exc):
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.old

    return _NoTF32()


def run_iters(cfg: Config, method: str, device, dtype: str | None, iters: int) -> dict:
    """``iters`` iterations from a fresh seeded state at late iterations (every gate passed):
    the losses of each, s/it (median after the first), per-phase peaks after the first."""
    from .train import train_step

    state, amp = build_state(cfg, method, device, dtype)
    batch = _batch(cfg, device)
    clock = PhasePeaks(device, state, batch)
    state.clock = clock
    t0, losses, secs = late_iteration(cfg), [], []
    torch.manual_seed(cfg.seed + 1)  # the same draws (ClassMix, augmentation) in every precision
    try:
        with clock.context():
            for i in range(iters):
                if i == 1:
                    clock.restart()  # steady state: optimizer states and G/D/F gradients exist
                tic = time.perf_counter()
                losses.append(train_step(state, batch, t0 + i, amp=amp))
                _sync(device)
                secs.append(time.perf_counter() - tic)
    finally:
        state.clock = None
        clock.close()
    scaler = getattr(state, "scaler", None)
    out = {
        "dtype": dtype or "fp32",
        "iterations": iters,
        "losses": losses,
        "finite": all(math.isfinite(v) for logs in losses for v in logs.values()),
        "sec_per_iter": round(statistics.median(secs[1:] or secs), 4),
        "first_iter_sec": round(secs[0], 4),
        "per_phase_mb": clock.peaks,
        "peak_mb": max(clock.peaks.values()),
        "memory_source": clock.source,
    }
    if scaler is not None:
        out["grad_scale"] = scaler.get_scale()
    del state, batch
    _release()
    return out


def check_precision(cfg, method, device, iters: int) -> dict:
    """bf16 where tensor cores support it, fp16 + GradScaler on CUDA (bf16 CPU autocast, tiny)."""
    from .train import bf16_native

    res = {}
    if device.type == "cpu" or bf16_native(device):
        res["bf16"] = run_iters(cfg, method, device, "bf16", iters)
    else:
        res["bf16"] = {"skipped": "no bf16 tensor cores (compute capability < 8): fp16 is used"}
    if device.type == "cuda":
        res["fp16"] = run_iters(cfg, method, device, "fp16", iters)
    else:
        res["fp16"] = {"skipped": "no CUDA: fp16 + GradScaler runs on a GPU only"}
    return res


def check_agreement(cfg, method, device, precisions: dict) -> dict:
    """First-iteration losses of each low precision against fp32 (TF32 off)."""
    with _fp32_exact(device):
        ref = run_iters(cfg, method, device, None, 1)["losses"][0]
    res = {"tolerance": f"|low - fp32| <= {ATOL} + {RTOL} * |fp32|, every loss", "fp32": ref}
    for name, r in precisions.items():
        if not isinstance(r, dict) or "losses" not in r:
            continue
        low = r["losses"][0]
        diffs = {k: round(abs(low[k] - v), 5) for k, v in ref.items() if k in low}
        bad = [k for k, v in ref.items() if k in low and abs(low[k] - v) > ATOL + RTOL * abs(v)]
        res[name] = {"abs_diff": diffs, "outside_tolerance": bad, "agree": not bad,
                     "missing": sorted(set(ref) ^ set(low))}  # fmt: skip
    return res


def check_estimate(cfg, method, device, measured: dict, dtype: str) -> dict:
    """``memory.trace_step`` on this device against the measured per-phase peaks (MiB)."""
    est = trace_step(cfg, method, device=device, dtype=dtype)
    _release()
    per = {}
    for phase, e in est["per_phase"].items():
        m = measured.get("per_phase_mb", {}).get(phase)
        per[phase] = {"estimate_mb": e, "measured_mb": m,
                      "ratio": round(m / e, 3) if m and e else None}  # fmt: skip
    return {"dtype": dtype, "estimate_peak_mb": est["peak_mb"], "estimate_static_mb": est["static_mb"],
            "measured_peak_mb": measured.get("peak_mb"), "peak_phase": est["peak_phase"],
            "per_phase": per}  # fmt: skip


def check_fit(cfg, method, device, card_mb: float = CARD_MB) -> dict:
    """Two fp16 iterations (a warm-up, one at a late iteration) with the allocator capped to a
    ``card_mb`` card less the CUDA context (``memory.GPU_ASSUMPTIONS``)."""
    if device.type != "cuda":
        return {"skipped": "no CUDA"}
    total = torch.cuda.get_device_properties(device).total_memory
    context = GPU_ASSUMPTIONS["cuda_context_mb"][0] * MB
    cap = card_mb * MB - context
    frac = min(1.0, cap / total)
    res = {"card_mb": card_mb, "allocator_cap_mb": round(cap / MB), "fraction": round(frac, 4),
           "dtype": "fp16"}  # fmt: skip
    _release()
    torch.cuda.set_per_process_memory_fraction(frac, device)
    try:
        res.update(run_iters(cfg, method, device, "fp16", 2), fits=True)
        res.pop("losses", None)
    except torch.cuda.OutOfMemoryError as e:
        res.update(fits=False, error=str(e).splitlines()[0][:300])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        _release()
    return res


def check_loader(cfg, data: Path, model_images_per_sec: float | None, batches: int) -> dict:
    from .bench import bench_loader

    res = bench_loader(cfg, data, batches=batches)
    if model_images_per_sec:
        res["model_images_per_sec"] = model_images_per_sec
        res["keeps_up"] = res["images_per_sec"] >= model_images_per_sec
    return res


def check_nccl(out: Path, data: Path, device, timeout: int = 240) -> dict:
    """A 2-process torchrun (NCCL) at the smoke preset with bf16/fp16 autocast: ranks agree."""
    n = torch.cuda.device_count() if device.type == "cuda" else 0
    if n < 2:
        return {"tested": False,
                "note": f"{n} GPU(s): NCCL untested; the same all-reduce logic runs with gloo on "
                        "CPU in tests/test_runner.py"}  # fmt: skip
    run = out / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "confeti", "train", "--preset", "smoke", "--iters", "4", "--method", "confeti",
           "--data", str(data), "--out", str(run), "--overwrite", "--skip-data-check",
           "--device", "cuda", "--set", "amp=true"]  # fmt: skip
    tic = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"tested": True, "ok": False, "error": f"timed out after {timeout} s"}
    res = {"tested": True, "returncode": p.returncode, "sec": round(time.perf_counter() - tic, 1)}
    summary = run / "summary.json"
    if p.returncode == 0 and summary.exists():
        s = json.loads(summary.read_text())
        sums = s.get("rank_checksums") or []
        res["rank_checksums"] = sums
        res["ok"] = len(sums) == 2 and all(
            math.isclose(a, b, rel_tol=1e-6) for a, b in zip(sums[0], sums[1])
        )
    else:
        res.update(ok=False, stderr_tail=p.stderr[-2000:])
    return res


def gpu_check(
    out, tiny: bool = False, method: str = "confeti", device=None, iters: int = 4
) -> dict:
    """Every check above; writes and returns ``out/gpu_check.json``."""
    from .runner import resolve_device
    from .train import bf16_native

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda" and not tiny:
        raise RuntimeError("gpu-check needs a CUDA device; on a CPU run it with --tiny")
    cfg = check_config(tiny)
    tic = time.perf_counter()
    res = {"preset": cfg.preset, "tiny": tiny, "method": method, "torch": torch.__version__,
           "crop_size": list(cfg.crop_size), "batch_size": cfg.batch_size,
           "backbone": cfg.backbone, "iterations": iters}  # fmt: skip
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        res["device"] = {"name": prop.name, "capability": list(torch.cuda.get_device_capability(device)),
                         "total_mb": round(prop.total_memory / MB), "count": torch.cuda.device_count(),
                         "bf16_native": bf16_native(device), "cuda": torch.version.cuda,
                         "cudnn": torch.backends.cudnn.version()}  # fmt: skip
    else:
        res["device"] = {"name": "cpu", "threads": torch.get_num_threads()}

    def timed(name, fn):
        t = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:  # one failed check must not hide the others
            res[name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
        res[name]["check_sec"] = round(time.perf_counter() - t, 1)
        _write(out, res)

    data = write_data(out, tiny)
    res["data_sec"] = round(time.perf_counter() - tic, 1)
    timed("precision", lambda: check_precision(cfg, method, device, iters))
    prec = res["precision"]
    timed("agreement", lambda: check_agreement(cfg, method, device, prec))
    main = next((prec[k] for k in ("bf16", "fp16") if "per_phase_mb" in prec.get(k, {})), {})
    timed("estimate", lambda: check_estimate(cfg, method, device, main, main.get("dtype", "bf16")))
    timed("fit_11gb", lambda: check_fit(cfg, method, device))
    ips = round(2 * cfg.batch_size / main["sec_per_iter"], 2) if main else None
    timed("loader", lambda: check_loader(cfg, data, ips, batches=4 if tiny else 20))
    timed("nccl", lambda: check_nccl(out, data, device))
    runs = [r for r in prec.values() if isinstance(r, dict) and "losses" in r]
    agree = [r["agree"] for r in res["agreement"].values() if isinstance(r, dict) and "agree" in r]
    res["ok"] = bool(runs) and all(r["finite"] for r in runs) and bool(agree) and all(agree)
    res["total_sec"] = round(time.perf_counter() - tic, 1)
    _write(out, res)
    return res


def _write(out: Path, res: dict) -> None:
    tmp = out / ".gpu_check.json.tmp"
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, out / "gpu_check.json")
