"""Pixel-level alignment: CUT (Contrastive Unpaired Translation, Park et al., ECCV 2020).

A ResNet generator G turns a source image into a target-styled one, x_s2t = G(x_s). A PatchGAN
discriminator D pushes G's output towards the target look (LSGAN), and PatchNCE keeps the content:
a patch of G(x) must match the patch of x at the same place better than any other patch of x,

    L_NCE(x, G(x)) = E_l E_i -log[ exp(q_i·k_i/τ) / (exp(q_i·k_i/τ) + Σ_{j≠i} exp(q_i·k_j/τ)) ]

with q = F_l(G_enc^l(G(x))) (queries), k = F_l(G_enc^l(x)) (keys, stop-gradient), F_l a small MLP
per encoder layer l, vectors L2-normalised, τ = 0.07, and negatives the other patches of the same
image. In CONFETI this module is trained jointly with the segmentor (docs/method.md §4, §8); the
semantic-consistency loss reaches G through ``StyleTransfer.g_step(extra_loss=...)``.

Taught in notebooks/02_pixel_alignment.ipynb.

Shape: images (B, 3, H, W), ImageNet-normalised outside this module, CUT's [-1, 1] range inside.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .datasets import denormalize, normalize


def to_cut_range(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised -> [-1, 1]: x01 = x·std + mean; (x01 - 0.5) / 0.5. Shape: (B,3,H,W)."""
    return (denormalize(x) - 0.5) / 0.5


def from_cut_range(y: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> ImageNet-normalised: normalize(y·0.5 + 0.5). Shape: (B, 3, H, W)."""
    return normalize(y * 0.5 + 0.5)


def _into_cut(x: torch.Tensor, memory_format=None) -> torch.Tensor:
    """``to_cut_range`` in the memory layout G and D run in (``StyleTransfer.memory_format``;
    None: the caller's)."""
    y = to_cut_range(x)
    return y if memory_format is None else y.contiguous(memory_format=memory_format)


def _out_of_cut(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``from_cut_range`` in the memory layout of ``like`` (the input image): a channels_last
    segmentor gets G's output in channels_last."""
    nhwc = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return from_cut_range(y).contiguous(
        memory_format=torch.channels_last if nhwc else torch.contiguous_format
    )


def _binomial(taps: list[float]) -> torch.Tensor:
    a = torch.tensor(taps)
    filt = a[:, None] * a[None, :]  # outer product: separable 2-D binomial filter
    return filt / filt.sum()


class BlurDown(nn.Module):
    """Anti-aliased ×½ downsampling: reflect-pad 1, blur with [1,2,1]ᵀ[1,2,1]/16, stride 2.

    Shape: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2)).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer(
            "filt", _binomial([1, 2, 1]).expand(channels, 1, 3, 3).clone(), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, self.filt.to(x.dtype), stride=2, groups=x.shape[1])


class BlurUp(nn.Module):
    """Anti-aliased ×2 upsampling: zero-insertion + blur with 4·[1,3,3,1]ᵀ[1,3,3,1]/64.

    As in the official code: replicate-pad 1, transposed depthwise conv (stride 2), crop 1 pixel
    on each side. Shape: (B, C, H, W) -> (B, C, 2H, 2W).
    """

    def __init__(self, channels: int):
        super().__init__()
        filt = _binomial([1, 3, 3, 1]) * 4  # ×stride² keeps the mean intensity after zero insertion
        self.register_buffer("filt", filt.expand(channels, 1, 4, 4).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        y = F.conv_transpose2d(x, self.filt.to(x.dtype), stride=2, padding=2, groups=x.shape[1])
        return y[:, :, 1:-1, 1:-1]  # (B, C, 2H+2, 2W+2) -> (B, C, 2H, 2W)


class ResnetBlock(nn.Module):
    """y = x + IN(conv3(pad(ReLU(IN(conv3(pad(x))))))), reflect pad. Shape: (B, C, H, W) -> same."""

    def __init__(self, dim: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Generator(nn.Module):
    """CUT's ResNet generator, one flat ``nn.Sequential`` so NCE layers are indices into it.

    Indices (n_downsampling=2): 0 reflect-pad (input level), 1-3 conv7/IN/ReLU, 4 conv3 ngf->2ngf,
    7 blur-down, 8 conv3 2ngf->4ngf, 11 blur-down, 12.. ResNet blocks (12 = block 1, 16 = block 5),
    then blur-up + conv/IN/ReLU twice, reflect-pad, conv7 -> 3, tanh.
    With ``grad_checkpoint`` set, each stage (stem, each down-sampling, each ResNet block, each
    up-sampling, head) runs under activation checkpointing while grad is on: only its input and
    the encoder outputs asked of it are kept, its forward is recomputed in the backward (the same
    values: G has no random op and no running statistics).
    Shape: (B, 3, H, W) in [-1, 1] -> (B, 3, H, W) in [-1, 1] (H, W multiples of 4).
    """

    def __init__(self, ngf: int = 64, n_blocks: int = 9, n_downsampling: int = 2):
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True),
        ]  # fmt: skip
        chans = [3, ngf, ngf, ngf]  # output channels of each layer, for nce_channels()
        for i in range(n_downsampling):
            c_in, c_out = ngf * 2**i, ngf * 2 ** (i + 1)
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.InstanceNorm2d(c_out), nn.ReLU(True),
                BlurDown(c_out),
            ]  # fmt: skip
            chans += [c_out] * 4
        c = ngf * 2**n_downsampling
        # layers per stage: stem, down-samplings, ResNet blocks, up-samplings, head
        stages = [4] + [4] * n_downsampling + [1] * n_blocks + [4] * n_downsampling + [3]
        layers += [ResnetBlock(c) for _ in range(n_blocks)]
        chans += [c] * n_blocks
        self.n_encoder = len(layers)  # valid NCE layer indices: 0 .. n_encoder - 1
        for i in range(n_downsampling):
            c_in, c_out = ngf * 2 ** (n_downsampling - i), ngf * 2 ** (n_downsampling - i - 1)
            layers += [
                BlurUp(c_in), nn.Conv2d(c_in, c_out, 3, padding=1), nn.InstanceNorm2d(c_out),
                nn.ReLU(True),
            ]  # fmt: skip
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        self._channels = chans
        # outputs the next layer overwrites (in-place ReLU) are copied when returned as features
        self._overwritten = {
            i for i, nxt in enumerate(layers[1:]) if isinstance(nxt, nn.ReLU) and nxt.inplace
        }
        # checkpointed units, (first, end) layer indices; none begins with an in-place layer
        ends = list(itertools.accumulate(stages))
        assert ends[-1] == len(layers)
        self._stages = list(zip([0, *ends[:-1]], ends))
        self.grad_checkpoint = False

    def forward(self, x: torch.Tensor, layers=None):
        """G(x); with ``layers`` also the encoder outputs there, taken from this same pass
        (so PatchNCE keys need no second encoder pass). Shape: -> (B, 3, H, W)[, feats]."""
        if layers is None:
            if self.grad_checkpoint and torch.is_grad_enabled():
                return self._walk(x, [], len(self.model))[0]
            return self.model(x)
        return self._walk(x, self.check_layers(layers), len(self.model))

    def check_layers(self, layers) -> list[int]:
        valid = range(self.n_encoder)
        if len(layers) == 0 or any(int(i) not in valid for i in layers):
            raise ValueError(
                f"nce layers {tuple(layers)} invalid: choose among {list(valid)} for this generator"
            )
        return [int(i) for i in layers]

    def nce_channels(self, layers) -> list[int]:
        """Channels at ``layers`` (ngf=64: 0 -> 3, 4 -> 128, 8 -> 256, 12.. -> 256)."""
        return [self._channels[i] for i in self.check_layers(layers)]

    def encode(self, x: torch.Tensor, layers) -> list[torch.Tensor]:
        """Outputs of the Sequential at ``layers``; stops after max(layers).

        Shape: (B, 3, H, W) -> list of (B, C_l, H_l, W_l).
        """
        layers = self.check_layers(layers)
        return self._walk(x, layers, max(layers) + 1)[1]

    def _walk(self, x, layers: list[int], stop: int):
        """Run layers 0 .. stop-1; return the last output and the outputs at (checked) ``layers``.

        Stage by stage, each under checkpointing if ``grad_checkpoint`` is set and grad is on."""
        feats = {}
        ckpt = self.grad_checkpoint and torch.is_grad_enabled()
        for first, end in self._stages:
            if first >= stop:
                break
            end = min(end, stop)
            want = [i for i in layers if first <= i < end]
            if ckpt:
                out = torch.utils.checkpoint.checkpoint(
                    self._run, x, first, end, want, use_reentrant=False
                )
            else:
                out = self._run(x, first, end, want)
            x = out[0]
            feats.update(zip(want, out[1:]))
        return x, [feats[i] for i in layers]

    def _run(self, x, first: int, end: int, want: list[int]):
        """Layers first .. end-1; returns (output, *outputs at ``want``)."""
        got = []
        for i in range(first, end):
            x = self.model[i](x)
            if i in want:
                got.append(x.clone() if i in self._overwritten else x)
        return (x, *got)


class Discriminator(nn.Module):
    """PatchGAN (70×70 receptive field for n_layers=3), as in the official code (anti-aliased):
    conv4-LReLU-blurdown, (conv4-IN-LReLU-blurdown) × (n-1), conv4-IN-LReLU, conv4 -> 1 channel.

    Shape: (B, 3, H, W) -> (B, 1, h, w) real/fake scores (h ≈ H / 2^n - 2).
    """

    def __init__(self, ndf: int = 64, n_layers: int = 3):
        super().__init__()

        def lrelu():
            return nn.LeakyReLU(0.2, True)

        layers: list[nn.Module] = [nn.Conv2d(3, ndf, 4, padding=1), lrelu(), BlurDown(ndf)]
        c = ndf
        for n in range(1, n_layers):
            c_out = ndf * min(2**n, 8)
            layers += [nn.Conv2d(c, c_out, 4, padding=1), nn.InstanceNorm2d(c_out), lrelu()]
            layers += [BlurDown(c_out)]
            c = c_out
        c_out = ndf * min(2**n_layers, 8)
        layers += [nn.Conv2d(c, c_out, 4, padding=1), nn.InstanceNorm2d(c_out), lrelu()]
        layers += [nn.Conv2d(c_out, 1, 4, padding=1)]  # 1-channel patch map
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchSampleMLP(nn.Module):
    """F: sample patch positions; embed each with Linear(C_l,dim)-ReLU-Linear(dim,dim); L2-normalise

    Built eagerly from ``Generator.nce_channels`` (the official code builds it lazily on first use).
    Shape: feats [(B, C_l, H_l, W_l)] -> [(B·N_l, dim)], N_l = min(num_patches, H_l·W_l).
    """

    def __init__(self, in_channels: list[int], dim: int = 256):
        super().__init__()
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(c, dim), nn.ReLU(True), nn.Linear(dim, dim))
            for c in in_channels
        )

    def forward(self, feats, num_patches: int, patch_ids=None):
        samples, ids = [], []
        for layer, (feat, mlp) in enumerate(zip(feats, self.mlps)):
            flat = feat.permute(0, 2, 3, 1).flatten(1, 2)  # (B, C, H, W) -> (B, H·W, C)
            hw = flat.shape[1]
            # as in the official code: one random set of positions for the whole batch
            idx = patch_ids[layer] if patch_ids is not None else torch.randperm(hw)[:num_patches]
            idx = idx.to(feat.device)
            z = mlp(flat[:, idx, :].flatten(0, 1))  # (B, N, C) -> (B·N, dim)
            samples.append(z / (z.norm(dim=1, keepdim=True) + 1e-7))  # z/||z|| (official eps)
            ids.append(idx)
        return samples, ids


def patch_nce_loss(
    feat_q: torch.Tensor, feat_k: torch.Tensor, batch_size: int, tau: float = 0.07
) -> torch.Tensor:
    """PatchNCE: CE over logits [q_i·k_i, q_i·k_j for all j of the same image] / τ, target 0.

    As in the official code: the self-pair j = i among the negatives is filled with -10 before /τ
    (its term exp(-10/τ) ≈ 1e-62 stays in the sum). Keys are detached. Mean over B·N queries.
    Shape: feat_q, feat_k (B·N, D), rows unit-norm -> scalar.
    """
    feat_k = feat_k.detach()
    d = feat_q.shape[1]
    l_pos = (feat_q * feat_k).sum(dim=1, keepdim=True)  # (B·N, 1): q_i·k_i
    q = feat_q.reshape(batch_size, -1, d)  # (B, N, D)
    k = feat_k.reshape(batch_size, -1, d)  # (B, N, D)
    n = q.shape[1]
    l_neg = torch.bmm(q, k.transpose(1, 2))  # (B, N, N): q_i·k_j within an image
    self_pair = torch.eye(n, dtype=torch.bool, device=q.device)[None]
    l_neg = l_neg.masked_fill(self_pair, -10.0).reshape(-1, n)  # (B·N, N)
    logits = torch.cat([l_pos, l_neg], dim=1) / tau  # (B·N, 1 + N)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float(), target)


def lsgan_loss(pred: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """LSGAN: mean (D(x) - 1)² for real, mean D(x)² for fake. Shape: (B, 1, h, w) -> scalar."""
    return F.mse_loss(pred.float(), torch.full_like(pred.float(), 1.0 if target_is_real else 0.0))


def init_weights(module: nn.Module, gain: float = 0.02) -> None:
    """As in the official code (init_type xavier): weights ~ xavier normal(gain), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class StyleTransfer(nn.Module):
    """G, D, F and their Adam optimizers (constant LR: the official code never steps CUT's LR).

    Public methods take ImageNet-normalised images; D and the NCE see CUT's [-1, 1] range.
    With a ``scaler`` (torch.amp.GradScaler) backward/step go through it; the caller calls
    ``scaler.update()`` once per iteration. Shape: images (B, 3, H, W), H and W multiples of 4.
    """

    def __init__(self, ngf: int = 64, n_blocks: int = 9, ndf: int = 64, d_layers: int = 3,
                 nce_layers=(0, 4, 8, 12, 16), num_patches: int = 256, nce_tau: float = 0.07,
                 lambda_gan: float = 1.0, lambda_nce: float = 1.0, lr: float = 2e-4,
                 betas=(0.5, 0.999), grad_checkpoint: bool = False):  # fmt: skip
        super().__init__()
        self.G, self.D = Generator(ngf, n_blocks), Discriminator(ndf, d_layers)
        self.G.grad_checkpoint = grad_checkpoint  # Generator: checkpointed stages (less memory)
        self.nce_layers = tuple(self.G.check_layers(nce_layers))
        self.F = PatchSampleMLP(self.G.nce_channels(self.nce_layers))
        for net in (self.G, self.D, self.F):
            init_weights(net)
        self.num_patches, self.nce_tau = num_patches, nce_tau
        self.lambda_gan, self.lambda_nce = lambda_gan, lambda_nce
        self.optimizers = {
            name: torch.optim.Adam(net.parameters(), lr=lr, betas=tuple(betas), foreach=True)
            for name, net in (("G", self.G), ("D", self.D), ("F", self.F))
        }
        self.memory_format = None  # of G's and D's activations (None: the caller's)
        # under torchrun: averages a list of gradients over the ranks (``runner._average``); called
        # before every optimizer step, so a GradScaler decides on the averaged gradients and skips
        # (or takes) the step on every rank alike
        self.sync_grads = None

    def set_memory_format(self, memory_format) -> None:
        """Run G and D in ``memory_format`` (weights and activations) whatever the caller's
        layout; G's output goes back in the layout of its input."""
        self.to(memory_format=memory_format)
        self.memory_format = memory_format

    def _cut(self, x: torch.Tensor) -> torch.Tensor:
        return _into_cut(x, self.memory_format)

    def optim_state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_optim_state_dict(self, d: dict) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(d[name])

    def translate(self, x_s: torch.Tensor) -> torch.Tensor:
        """x_s2t = G(x_s), graph to G kept. Shape: (B, 3, H, W) -> same, ImageNet-normalised,
        in the memory layout of x_s (G runs in ``memory_format``)."""
        return _out_of_cut(self.G(self._cut(x_s)), x_s)

    def translate_with_keys(self, x_s: torch.Tensor):
        """x_s2t = G(x_s) and G's encoder outputs at the NCE layers from the same pass.

        Pass them to ``g_step(src_feats=...)``: they are the PatchNCE keys of x_s, identical to a
        fresh ``G.encode(x_s)`` while G has not stepped (the official code re-encodes x_s).
        Shape: (B, 3, H, W) -> (B, 3, H, W), [(B, C_l, H_l, W_l)].
        """
        y, feats = self.G(self._cut(x_s), self.nce_layers)
        return _out_of_cut(y, x_s), [f.detach() for f in feats]

    def _nce(self, a: torch.Tensor, b: torch.Tensor, keys=None) -> torch.Tensor:
        """(1/L) Σ_l PatchNCE(queries from b, keys from a) on [-1, 1] images, × λ_NCE.

        ``keys``: G's encoder outputs for ``a`` if already computed (else one no-grad pass)."""
        with torch.no_grad():  # keys are detached anyway: no graph needed for G(a) or F(keys)
            feats_a = self.G.encode(a, self.nce_layers) if keys is None else keys
            feat_k, ids = self.F(feats_a, self.num_patches)
        feat_q, _ = self.F(self.G.encode(b, self.nce_layers), self.num_patches, ids)
        losses = [patch_nce_loss(q, k, a.shape[0], self.nce_tau) for q, k in zip(feat_q, feat_k)]
        return self.lambda_nce * torch.stack(losses).mean()

    def nce(self, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        """PatchNCE, keys from x_a, queries from x_b (ImageNet-normalised). Shape: -> ()."""
        return self._nce(self._cut(x_a), self._cut(x_b))

    def _step(self, loss: torch.Tensor, names, scaler) -> None:
        (loss if scaler is None else scaler.scale(loss)).backward()
        if self.sync_grads is not None:  # every rank reaches this all-reduce, inf or not
            self.sync_grads([p.grad for n in names for g in self.optimizers[n].param_groups
                             for p in g["params"] if p.grad is not None])  # fmt: skip
        for n in names:
            if scaler is None:
                self.optimizers[n].step()
            else:  # skipped where the (averaged) gradients hold an inf: on every rank alike
                scaler.step(self.optimizers[n])

    def d_step(self, x_s2t: torch.Tensor, x_t: torch.Tensor, scaler=None) -> dict:
        """L_D = ½[MSE(D(x̃_s.detach()), 0) + MSE(D(x_t), 1)]; one D step. Returns {"loss_D"}."""
        self.D.requires_grad_(True)
        self.optimizers["D"].zero_grad(set_to_none=True)
        fake, real = self._cut(x_s2t.detach()), self._cut(x_t)
        # one D pass over [fake; real]: D has no batch statistics (InstanceNorm), so this equals
        # two passes, with half the kernel launches
        pred_fake, pred_real = self.D(torch.cat([fake, real])).split([len(fake), len(real)])
        loss = 0.5 * (lsgan_loss(pred_fake, False) + lsgan_loss(pred_real, True))
        self._step(loss, ["D"], scaler)
        return {"loss_D": loss.detach()}  # tensors: the caller transfers all logs at once

    def g_step(self, x_s, x_t, x_s2t, extra_loss=None, scaler=None, src_feats=None) -> dict:
        """L_G = λ_GAN·MSE(D(x̃_s), 1) + ½[NCE(x_s, x̃_s) + NCE(x_t, G(x_t))] (λ_NCE inside NCE).

        ``extra_loss`` (the semantic consistency, graph to G) joins the same backward. G and F grads
        are zeroed first; D is frozen (requires_grad restored after); steps G and F.
        ``src_feats``: the keys of x_s from ``translate_with_keys`` (saves one encoder pass).
        """
        self.optimizers["G"].zero_grad(set_to_none=True)
        self.optimizers["F"].zero_grad(set_to_none=True)
        flags = [p.requires_grad for p in self.D.parameters()]
        self.D.requires_grad_(False)
        try:
            src, tgt, fake = self._cut(x_s), self._cut(x_t), self._cut(x_s2t)
            # as in the official code (nce_idt): identity NCE on G(x_t); keys of x_t from this pass
            idt, tgt_feats = self.G(tgt, self.nce_layers)
            loss_gan = self.lambda_gan * lsgan_loss(self.D(fake), True)
            loss_nce = 0.5 * (self._nce(src, fake, src_feats) + self._nce(tgt, idt, tgt_feats))
            loss_g = loss_gan + loss_nce
            total = loss_g if extra_loss is None else loss_g + extra_loss
            self._step(total, ["G", "F"], scaler)
        finally:
            for p, f in zip(self.D.parameters(), flags):
                p.requires_grad_(f)
        return {"loss_G_gan": loss_gan.detach(), "loss_nce": loss_nce.detach(), "loss_G": loss_g.detach()}  # fmt: skip

    def pretrain_step(self, x_s: torch.Tensor, x_t: torch.Tensor) -> dict:
        """One standalone CUT iteration (phase 0): translate, D step, G + F step.

        Returns the losses as floats (one transfer for all of them)."""
        x_s2t, keys = self.translate_with_keys(x_s)
        logs = {**self.d_step(x_s2t, x_t), **self.g_step(x_s, x_t, x_s2t, src_feats=keys)}
        return dict(zip(logs, torch.stack(list(logs.values())).tolist()))


def class_contrast(x: torch.Tensor, labels: torch.Tensor, num_classes: int = 19, ring: int = 2,
                   min_pixels: int = 4) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """How much each class stands out from what surrounds it: what a translation must keep for a
    thin object (a pole, a bicycle) to stay visible under its unchanged label.

    For every image b and class c with at least ``min_pixels`` pixels M_bc, the ring R_bc is the
    labelled pixels within ``ring`` pixels of M_bc but not in it, and
    contrast_bc = || mean_{p in M_bc} x_p - mean_{p in R_bc} x_p ||_2 (RGB of denormalised x).
    Returns (sums, counts) per class over the batch; sums / counts is the mean contrast, and
    the same labels on G(x) against x say how much of it G keeps.
    Shape: x (B, 3, H, W) ImageNet-normalised, labels (B, H, W) long -> (C,), (C,).
    """
    rgb = denormalize(x).float()  # [0, 1]
    valid = (labels >= 0) & (labels < num_classes)  # (B, H, W)
    onehot = F.one_hot(torch.where(valid, labels, 0), num_classes).permute(0, 3, 1, 2)
    m = (onehot * valid[:, None]).float()  # (B, C, H, W): M_bc
    near = F.max_pool2d(m, 2 * ring + 1, stride=1, padding=ring)  # dilation by ``ring``
    r = near * (1 - m) * valid[:, None]  # (B, C, H, W): R_bc
    n_m, n_r = m.sum((2, 3)), r.sum((2, 3))  # (B, C)
    mean_m = torch.einsum("bkhw,bchw->bck", rgb, m) / n_m.clamp(min=1)[..., None]  # (B, C, 3)
    mean_r = torch.einsum("bkhw,bchw->bck", rgb, r) / n_r.clamp(min=1)[..., None]
    ok = (n_m >= min_pixels) & (n_r > 0)  # (B, C)
    d = (mean_m - mean_r).norm(dim=-1) * ok  # (B, C)
    return d.sum(0), ok.sum(0)
