"""One dataclass holds every knob; three presets name the settings we use.

- ``smoke()``: seconds per run on a CPU; what the tests and ``CONFETI_SMOKE=1`` notebooks use.
- ``toy()``: a few minutes per run on a 2-core laptop, on the ToyStreets benchmark.
- ``paper()``: GTA5 -> Cityscapes with the official settings (see docs/deviations.md).

Gates (warm-ups, start iterations) are fractions of the run: ``scale_schedule`` rescales them and
the LR warm-up to any run length, in one visible place. EMA time constants (teacher, prototypes)
are not: what the teacher must average over is a share of a pass over the target data, not a
share of the run (``ema_alpha_for``).
Override any field with ``dataclasses.replace(cfg, field=value)``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

PRESETS = ("smoke", "toy", "paper")
METHODS = (
    "source_only",
    "oracle",
    "fda",
    "style",
    "contrast",
    "selftrain",
    "selftrain+style",
    "selftrain+contrast",
    "confeti",
)
SCHEDULES = ("single_stage", "two_stage")


@dataclass
class Config:
    preset: str = "toy"
    seed: int = 0

    # ---- data -----------------------------------------------------------------------------
    source: str = "gta5"  # gta5 | synthia (the source folder under --data)
    num_classes: int = 19
    source_resize: tuple[int, int] | None = None  # (H, W) box the image is resized into
    target_resize: tuple[int, int] | None = None
    crop_size: tuple[int, int] = (64, 128)  # (H, W)
    cat_max_ratio: float = 0.75  # re-draw crops where one class covers more than this
    batch_size: int = 4  # per domain: B source + B target crops per iteration
    num_workers: int = 0
    rcs: bool = True  # rare-class sampling on the source
    rcs_temperature: float = 0.01
    rcs_min_pixels: int = 3000
    eval_max_images: int | None = None  # evaluate on a prefix of the split (None = all)

    # ---- segmentor --------------------------------------------------------------------------
    backbone: str = "tiny"  # resnet101 | resnet50 | resnet34 | resnet18 | tiny
    backbone_width: int = 32  # base width of the "tiny" backbone
    aspp_dilations: tuple[int, ...] = (1, 2, 3, 4)
    pretrained: str | None = None  # None | "imagenet" | path/to/state_dict.pt

    # ---- optimisation (AdamW + poly with linear warm-up, as the official code) -------------
    iters: int = 1000
    lr: float = 6e-5
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    warmup_iters: int = 1500
    poly_power: float = 1.0
    amp: bool = True  # autocast on CUDA (bf16 if supported, else fp16 + GradScaler)
    channels_last: bool = True  # NHWC activations: faster convolutions on CPU and GPU
    # activation checkpointing of G's stages and of the consistency's student pass: their
    # forward is recomputed in the backward instead of kept (same maths, less memory)
    grad_checkpoint: bool = False

    # ---- self-training base (DACS / DAFormer) ----------------------------------------------
    ema_alpha: float = 0.999
    pseudo_threshold: float = 0.968
    mix_start: int = 0  # the mixed (self-training) branch from this iteration on (v1: 0)
    pseudo_ignore_top: int = 15
    pseudo_ignore_bottom: int = 120
    color_jitter_p: float = 0.8
    color_jitter_strength: float = 0.2
    blur_p: float = 0.5
    fd_weight: float = 0.005
    fd_ratio: float = 0.75

    # ---- pixel-level alignment: CUT ----------------------------------------------------------
    ngf: int = 64
    n_blocks: int = 9
    ndf: int = 64
    d_layers: int = 3
    nce_layers: tuple[int, ...] = (0, 4, 8, 12, 16)
    num_patches: int = 256
    nce_tau: float = 0.07
    lambda_gan: float = 1.0
    lambda_nce: float = 1.0
    cut_lr: float = 2e-4
    style_pretrain_iters: int = 0  # phase 0: standalone CUT before the segmentor trains
    style_joint: bool = True  # keep training G (CUT + consistency) while the segmentor trains
    fda_beta: float = 0.01  # the fda method: swapped low-frequency window, b = beta * min(H, W)

    # ---- feature-level alignment: prototypes and contrast ---------------------------------
    proto_dim: int = 512
    proto_momentum: float = 0.999
    proto_top_k: int = 32
    proto_resolution: str = "label"  # label (official: top-k over pixels) | feature (cheap)
    tau: float = 0.1
    contrast_samples: int = 4096
    contrast_weight: float = 0.5
    reg_weight: float = 2.0
    cam_weight: float = 1.0
    psc_weight: float = 0.1
    psc_judge: str = "student"  # student (paper code) | teacher (follow-up, normalised, /tau)
    # step 10, the contrast (and its regulariser) on the target with the pseudo-labels; False
    # ablates that one term (a diagnostic: the official code always has it)
    target_contrast: bool = True

    # ---- warm-up gates (iterations) -----------------------------------------------------------
    proto_warmup_iters: int = 3000  # prototypes from pasted source only, uniform weights
    contrast_start: int = 3000
    cam_mix_start: int = 2000

    # ---- CONFETI schedule ---------------------------------------------------------------------
    schedule: str = "single_stage"  # single_stage | two_stage

    # ---- logging / evaluation -------------------------------------------------------------
    log_every: int = 10
    eval_every: int = 4000
    ckpt_every: int = 500

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; valid fields: {sorted(names)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def validate(self) -> Config:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {PRESETS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.proto_resolution not in ("label", "feature"):
            raise ValueError(f"proto_resolution must be 'label' or 'feature', got {self.proto_resolution!r}")  # fmt: skip
        if self.psc_judge not in ("student", "teacher"):
            raise ValueError(f"psc_judge must be 'student' or 'teacher', got {self.psc_judge!r}")
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError("iters and batch_size must be >= 1")
        if any(s % 8 for s in self.crop_size):
            raise ValueError(f"crop_size {self.crop_size} must be divisible by 8 (output stride)")
        return self


# The official gates over a 40k-iteration run (the follow-up code's length; the paper's code uses
# the same constants in each 80k stage): the toy keeps their fractions.
_PAPER_ITERS = 40_000
_PAPER_GATES = dict(proto_warmup_iters=3000, contrast_start=3000, cam_mix_start=2000)
_PAPER_WARMUP = 1500
_GATES = ("warmup_iters", "proto_warmup_iters", "contrast_start", "cam_mix_start", "mix_start")


def paper_gates(iters: int) -> dict:
    """The official gates and LR warm-up at their fractions of a run of ``iters`` iterations."""
    f = iters / _PAPER_ITERS
    return dict(warmup_iters=int(round(_PAPER_WARMUP * f)),
                **{k: int(round(v * f)) for k, v in _PAPER_GATES.items()})  # fmt: skip


def ema_alpha_for(target_images: int, batch_size: int, passes: float = 2000 / 2975) -> float:
    """alpha = 1 - 1/tc, tc = passes * target_images / batch_size iterations.

    The teacher averages the student over its last ~tc iterations. The paper's alpha = 0.999
    (tc = 1,000 iterations at batch 2) averages over 2,000 target images, 0.67 of a pass over
    Cityscapes' 2,975: the same share of a pass gives tc = 168 iterations on ToyStreets (1,000
    target images, batch 4), whatever the run length.
    """
    return 1.0 - 1.0 / (passes * target_images / batch_size)


def scale_schedule(cfg: Config, iters: int) -> Config:
    """``cfg`` with ``iters`` and its gates and LR warm-up rescaled to that run length.

    gate_new = round(gate * iters / cfg.iters): each keeps its fraction of the run. The EMA
    momenta (``ema_alpha``, ``proto_momentum``) are left as they are (see ``ema_alpha_for``).
    """
    f = iters / cfg.iters
    return dataclasses.replace(
        cfg, iters=iters, **{k: int(round(getattr(cfg, k) * f)) for k in _GATES}
    )


def paper() -> Config:
    """GTA5 -> Cityscapes with the official code's model and data settings: DLv2-R101, 512 crops,
    batch 2. 40k iterations in one stage, as the follow-up code (CONFETII); the paper's code (v1)
    trains 80k per stage: ``--set iters=80000 --set schedule=two_stage`` (docs/deviations.md row 2).
    """
    return Config(
        preset="paper",
        seed=114,
        source_resize=(720, 1280),
        target_resize=(640, 1280),
        crop_size=(512, 512),
        batch_size=2,
        num_workers=4,
        backbone="resnet101",
        aspp_dilations=(6, 12, 18, 24),
        pretrained="imagenet",
        iters=40_000,
        eval_every=4000,
        ckpt_every=1000,
        log_every=50,
        grad_checkpoint=True,  # traced peak 14.5 -> 4.4 GB: fits 11 GB (README, Memory ...)
    ).validate()


TOY_ITERS = 12_800  # the longest run length measured for every method (README "Convergence")


def toy() -> Config:
    """ToyStreets on a 2-core CPU: a narrow dilated ResNet, 64x128 crops, a small CUT.

    ASPP dilations are scaled to the 8x16 feature map (dilation 24 would only see padding).
    """
    cfg = Config(
        preset="toy",
        source_resize=(64, 128),  # ToyStreets is 128x256; train and test at half resolution
        target_resize=(64, 128),
        crop_size=(64, 128),
        batch_size=4,
        backbone="tiny",
        backbone_width=32,
        aspp_dilations=(1, 2, 3, 4),
        pretrained=None,
        lr=1e-3,
        weight_decay=0.01,
        amp=False,
        pseudo_threshold=0.968,  # the paper's
        pseudo_ignore_top=0,
        pseudo_ignore_bottom=0,
        rcs_min_pixels=100,  # ~0.3% of a 128x256 label, as 3000 px of a 1280x720 GTA5 frame
        fd_weight=0.0,  # no ImageNet backbone on ToyStreets: the feature distance is skipped
        ngf=8,
        n_blocks=2,
        ndf=16,
        d_layers=2,
        nce_layers=(0, 4, 8, 12),
        num_patches=64,
        cut_lr=2e-4,
        style_pretrain_iters=300,  # phase 0: G learns the city look before the segmentor uses it
        fda_beta=0.05,  # b = 3 at 64 px (0.01 would swap the mean colour only; 5 at 512 px)
        proto_dim=64,
        # one weight set, the paper's code (v1): contrast 0.5, regulariser 2.0, CAM 1.0, PSC 0.1
        contrast_weight=0.5,
        reg_weight=2.0,
        cam_weight=1.0,
        psc_weight=0.1,
        contrast_samples=1024,
        ema_alpha=ema_alpha_for(1000, 4),  # tc = 168 iterations (ToyStreets: 1,000 target images)
        proto_momentum=ema_alpha_for(1000, 4),
        log_every=10,
        eval_every=10**9,
        ckpt_every=100,
        iters=TOY_ITERS,
        **paper_gates(TOY_ITERS),
        # the mixed branch waits for the first 7.5 % of the run (the follow-up code's 3k of 40k):
        # a randomly initialised teacher's pseudo-labels are noise (chosen on the tuning split,
        # results/tuning.json)
        mix_start=int(round(0.075 * TOY_ITERS)),
    )
    return cfg.validate()


def smoke() -> Config:
    """Tiny everything: a whole run in seconds (tests, ``CONFETI_SMOKE=1`` notebooks)."""
    cfg = dataclasses.replace(
        toy(),
        preset="smoke",
        source_resize=(32, 64),
        target_resize=(32, 64),
        crop_size=(32, 64),
        rcs_min_pixels=20,
        style_pretrain_iters=3,
        batch_size=2,
        backbone_width=8,
        ngf=4,
        n_blocks=1,
        ndf=8,
        num_patches=16,
        proto_dim=16,
        contrast_samples=128,
        eval_max_images=8,
        log_every=2,
        ckpt_every=5,
        ema_alpha=0.5,  # tc = 2 iterations: a 10-iteration run still moves its teacher
        proto_momentum=0.5,
    )
    return scale_schedule(cfg, 10).validate()


def get_preset(name: str) -> Config:
    """``"toy"`` -> ``toy()``; an unknown name lists the valid ones."""
    presets = {"smoke": smoke, "toy": toy, "paper": paper}
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    return presets[name]()


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


__all__ = ["Config", "PRESETS", "METHODS", "SCHEDULES", "get_preset", "paper", "toy", "smoke"]
