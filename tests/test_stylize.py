"""CUT style transfer: shapes, range conversion, PatchNCE by hand, gradient routing, learning."""

import copy
import math

import pytest
import torch

from confeti.datasets import denormalize, normalize
from confeti.stylize import (
    BlurDown,
    BlurUp,
    Discriminator,
    Generator,
    PatchSampleMLP,
    StyleTransfer,
    from_cut_range,
    lsgan_loss,
    patch_nce_loss,
    to_cut_range,
)

TINY = dict(ngf=4, n_blocks=2, ndf=4, d_layers=2, nce_layers=(0, 4, 8, 12), num_patches=8)


@pytest.fixture(autouse=True)
def one_thread():
    # the shared 2-core machine: two OpenMP threads fighting other jobs are ~100x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _changed(a, b):
    return all(not torch.equal(x, y) for x, y in zip(a, b))


def _pair(seed=0, b=2, h=16, w=32):
    g = torch.Generator().manual_seed(seed)
    return normalize(torch.rand(b, 3, h, w, generator=g)), normalize(
        torch.rand(b, 3, h, w, generator=g)
    )


# ---------------------------------------------------------------------------------------------
# range conversion and building blocks


def test_cut_range_round_trip():
    y = torch.rand(2, 3, 4, 5) * 2 - 1
    assert torch.allclose(to_cut_range(from_cut_range(y)), y, atol=1e-6)
    x01 = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 3, 1).expand(1, 3, 3, 2)
    assert torch.allclose(
        to_cut_range(normalize(x01))[0, :, :, 0],
        torch.tensor([-1.0, 0.0, 1.0]).expand(3, 3),
        atol=1e-6,
    )


def test_blur_resampling_shapes_and_constants():
    x = torch.full((1, 2, 7, 10), 0.3)
    assert BlurDown(2)(x).shape == (1, 2, 4, 5)  # ceil(H/2), ceil(W/2)
    assert BlurUp(2)(x).shape == (1, 2, 14, 20)
    # both filters sum to one per output pixel: a constant image stays the same constant
    assert torch.allclose(BlurDown(2)(x), torch.tensor(0.3))
    assert torch.allclose(BlurUp(2)(x), torch.tensor(0.3))


@pytest.mark.parametrize("hw", [(32, 32), (32, 64), (64, 128)])
def test_generator_and_discriminator_shapes(hw):
    torch.manual_seed(0)
    x = torch.rand(2, 3, *hw) * 2 - 1
    y = Generator(ngf=4, n_blocks=2)(x)
    assert y.shape == x.shape and y.abs().max() <= 1
    h, w = hw
    for _ in range(
        3
    ):  # each of the n_layers=3 blocks: conv4 (p=1) -> size-1, blur-down -> ceil(/2)
        h, w = math.ceil((h - 1) / 2), math.ceil((w - 1) / 2)
    h, w = h - 2, w - 2  # two more conv4 (p=1)
    assert Discriminator(ndf=4, n_layers=3)(x).shape == (2, 1, h, w)


def test_encode_layers_and_channels():
    torch.manual_seed(0)
    G = Generator(ngf=4, n_blocks=9)
    assert len(G.model) == 32  # 12 encoder layers + 9 blocks + 8 up layers + pad, conv, tanh
    layers = (0, 4, 8, 12, 16)
    assert G.nce_channels(layers) == [3, 8, 16, 16, 16]
    x = torch.rand(2, 3, 16, 32) * 2 - 1
    feats = G.encode(x, layers)
    assert [f.shape[1] for f in feats] == G.nce_channels(layers)
    sizes = [tuple(f.shape[2:]) for f in feats]
    assert sizes == [(22, 38), (16, 32), (8, 16), (4, 8), (4, 8)]  # layer 0 is the reflect-pad(3)
    assert torch.equal(feats[4], G.model[:17](x))  # 16 = output of the fifth ResNet block
    assert torch.equal(feats[0], torch.nn.functional.pad(x, (3, 3, 3, 3), mode="reflect"))


def test_invalid_nce_layer_raises():
    G = Generator(ngf=4, n_blocks=2)  # encoder indices 0..13
    assert G.nce_channels((13,)) == [16]
    with pytest.raises(ValueError, match="13"):
        G.nce_channels((0, 14))
    with pytest.raises(ValueError, match="choose among"):
        StyleTransfer(ngf=4, n_blocks=2, nce_layers=(0, 4, 8, 12, 16))


def test_patch_sampler_same_positions_and_unit_norm():
    torch.manual_seed(0)
    F = PatchSampleMLP([3, 5], dim=6)
    feats = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    out, ids = F(feats, num_patches=8)
    assert [o.shape for o in out] == [(16, 6), (8, 6)]  # 2·min(8, 16), 2·min(8, 4)
    assert torch.allclose(out[0].norm(dim=1), torch.ones(16), atol=1e-5)
    out2, ids2 = F(feats, num_patches=8, patch_ids=ids)
    assert all(torch.equal(a, b) for a, b in zip(ids, ids2))
    assert all(torch.equal(a, b) for a, b in zip(out, out2))


# ---------------------------------------------------------------------------------------------
# losses by hand


def test_patch_nce_two_patches_by_hand():
    tau = 0.5
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    # q0·k0 = 0.6, q0·k1 = 0.8, q1·k0 = 0.8, q1·k1 = 0.6. Convention (as CUT): the negatives are
    # every key of the image with the self-pair replaced by -10, so
    #   patch 0: logits [q0·k0, -10, q0·k1]/τ = [0.6, -10, 0.8]/τ
    #   patch 1: logits [q1·k1, q1·k0, -10]/τ = [0.6, 0.8, -10]/τ
    # loss_i = -0.6/τ + log(e^{0.6/τ} + e^{0.8/τ} + e^{-10/τ}) = log(1 + e^{0.2/τ} + e^{-10.6/τ})
    #        = log(1 + e^{0.4} + e^{-21.2}) = log(2.49182...) = 0.91302...
    expected = math.log(1 + math.exp(0.2 / tau) + math.exp(-10.6 / tau))
    got = patch_nce_loss(q, k, batch_size=1, tau=tau)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.91302, abs=1e-5)


def test_patch_nce_orthogonal_identity_is_low_and_simplex_is_minimum():
    n, tau = 4, 0.5  # a mild τ keeps every term within float32's resolution
    eye = torch.eye(n)
    # identical q = k, orthogonal patches: logits [1, 0 (n-1 times), -10]/τ
    ortho = math.log(1 + (n - 1) * math.exp(-1 / tau) + math.exp(-11 / tau))
    assert patch_nce_loss(eye, eye, 1, tau).item() == pytest.approx(ortho, rel=1e-5)
    permuted = patch_nce_loss(eye, eye[[1, 2, 3, 0]], 1, tau).item()  # positive 0, one negative 1
    assert permuted == pytest.approx(
        math.log(1 + math.exp(1 / tau) + (n - 2) + math.exp(-10 / tau)), rel=1e-5
    )
    assert permuted > ortho + 1
    # the global minimum for n unit vectors: a regular simplex, q_i·k_j = -1/(n-1) for j != i
    s = eye - eye.mean(0)
    s = s / s.norm(dim=1, keepdim=True)
    simplex = math.log(1 + (n - 1) * math.exp(-(1 + 1 / (n - 1)) / tau) + math.exp(-11 / tau))
    assert patch_nce_loss(s, s, 1, tau).item() == pytest.approx(simplex, rel=1e-4)
    assert simplex < ortho


def test_patch_nce_negatives_stay_within_each_image_and_keys_detached():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 5), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(6, 5), dim=1).requires_grad_()
    both = patch_nce_loss(q, k, batch_size=2)
    apart = (patch_nce_loss(q[:3], k[:3], 1) + patch_nce_loss(q[3:], k[3:], 1)) / 2
    assert both.item() == pytest.approx(apart.item(), rel=1e-6)
    both.backward()
    assert q.grad is not None and k.grad is None


def test_lsgan_by_hand():
    pred = torch.tensor([0.5, 2.0])
    assert lsgan_loss(pred, True).item() == pytest.approx((0.25 + 1.0) / 2)
    assert lsgan_loss(pred, False).item() == pytest.approx((0.25 + 4.0) / 2)


def test_xavier_init_and_eager_F():
    torch.manual_seed(0)
    st = StyleTransfer(**TINY)
    biases = [m.bias for m in st.modules() if getattr(m, "bias", None) is not None]
    assert len(biases) > 10 and all(not b.detach().any() for b in biases)
    lin = st.F.mlps[1][2]  # Linear(256, 256): xavier std = 0.02·sqrt(2 / (256 + 256))
    assert lin.weight.std().item() == pytest.approx(0.02 * math.sqrt(2 / 512), rel=0.05)
    assert [m[0].in_features for m in st.F.mlps] == st.G.nce_channels(TINY["nce_layers"])
    assert sum(p.numel() for p in st.optimizers["F"].param_groups[0]["params"]) > 0


# ---------------------------------------------------------------------------------------------
# StyleTransfer: translate, gradient routing, optimizer state, learning


def test_translate_range_and_graph():
    torch.manual_seed(0)
    st = StyleTransfer(**TINY)
    x_s, _ = _pair()
    x_s2t = st.translate(x_s)
    assert x_s2t.shape == x_s.shape and x_s2t.requires_grad
    y = to_cut_range(x_s2t)
    assert torch.allclose(y, st.G(to_cut_range(x_s)), atol=1e-5)
    assert y.abs().max() <= 1 + 1e-5
    assert denormalize(x_s2t).min() >= -1e-5 and denormalize(x_s2t).max() <= 1 + 1e-5


def test_d_step_moves_only_D_and_detaches_x_s2t():
    torch.manual_seed(0)
    st = StyleTransfer(**TINY)
    x_s, x_t = _pair()
    g0, f0, d0 = _params(st.G), _params(st.F), _params(st.D)
    logs = st.d_step(st.translate(x_s), x_t)
    assert set(logs) == {"loss_D"} and logs["loss_D"].dim() == 0  # a tensor: no host sync
    assert not logs["loss_D"].requires_grad
    logs = {k: float(v) for k, v in logs.items()}
    assert logs["loss_D"] == pytest.approx(0.5, abs=0.01)  # D ≈ 0 at init: ½(0² + (0-1)²)
    assert _same(g0, _params(st.G)) and _same(f0, _params(st.F))
    assert _changed(d0, _params(st.D))
    assert all(p.grad is None for p in st.G.parameters())  # no gradient went back through x_s2t


def test_g_step_moves_G_and_F_not_D():
    torch.manual_seed(0)
    st = StyleTransfer(**TINY)
    x_s, x_t = _pair()
    x_s2t = st.translate(x_s)
    st.d_step(x_s2t, x_t)
    d_grads = [p.grad.clone() for p in st.D.parameters()]
    g0, f0, d0 = _params(st.G), _params(st.F), _params(st.D)
    logs = {k: float(v) for k, v in st.g_step(x_s, x_t, x_s2t).items()}
    assert set(logs) == {"loss_G_gan", "loss_nce", "loss_G"}
    assert logs["loss_G"] == pytest.approx(logs["loss_G_gan"] + logs["loss_nce"], rel=1e-6)
    assert _changed(g0, _params(st.G)) and _changed(f0, _params(st.F))
    assert _same(d0, _params(st.D))
    assert all(torch.equal(a, p.grad) for a, p in zip(d_grads, st.D.parameters()))
    assert all(p.requires_grad for p in st.D.parameters())  # unfrozen again


def test_extra_loss_gradient_joins_the_G_backward():
    torch.manual_seed(0)
    base = StyleTransfer(**TINY)
    x_s, x_t = _pair()
    runs = []
    for extra in (False, True):
        st = copy.deepcopy(base)
        for p in st.G.parameters():  # stale gradients: g_step must zero them before its forward
            p.grad = torch.full_like(p, 7.0)
        x_s2t = st.translate(x_s)
        extra_loss = 3.0 * x_s2t.mean() if extra else None
        torch.manual_seed(1)  # same patch positions in both runs
        st.g_step(x_s, x_t, x_s2t, extra_loss=extra_loss)
        runs.append(st)
    # the gradient of the extra term alone, on a third copy
    ref = copy.deepcopy(base)
    (3.0 * ref.translate(x_s).mean()).backward()
    # tolerance: float32 rounding of the (large) GAN + NCE gradients, e.g. the exactly-zero grads
    # of conv biases followed by instance norm come out as ~1e-4 noise
    tol = 1e-5 * max(float(p.grad.abs().max()) for p in runs[0].G.parameters())
    assert max(float(p.grad.abs().max()) for p in ref.G.parameters()) > 100 * tol
    for p0, p1, pr in zip(runs[0].G.parameters(), runs[1].G.parameters(), ref.G.parameters()):
        assert torch.allclose(p1.grad - p0.grad, pr.grad, atol=tol)
    # the update differs somewhere in G. Not in every tensor: Adam's first step moves each weight
    # by lr·g/(|g| + eps) ≈ lr·sign(g), so a tensor whose gradients keep their signs (the
    # 3-element output bias, say) gets the same update with or without the extra term
    before, after = _params(runs[0].G), _params(runs[1].G)
    assert any(not torch.equal(x, y) for x, y in zip(before, after))


def test_optim_state_round_trip():
    torch.manual_seed(0)
    a = StyleTransfer(**TINY)
    x_s, x_t = _pair()
    a.pretrain_step(x_s, x_t)
    b = StyleTransfer(**TINY)
    b.load_state_dict(a.state_dict())
    b.load_optim_state_dict(copy.deepcopy(a.optim_state_dict()))
    assert set(a.optim_state_dict()) == {"G", "D", "F"}
    for st in (a, b):
        torch.manual_seed(2)
        st.pretrain_step(x_s, x_t)
    assert _same(_params(a), _params(b))


def test_grad_scaler_path_runs():
    torch.manual_seed(0)
    st = StyleTransfer(**TINY)
    x_s, x_t = _pair()
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    g0 = _params(st.G)
    x_s2t = st.translate(x_s)
    logs = {**st.d_step(x_s2t, x_t, scaler=scaler), **st.g_step(x_s, x_t, x_s2t, scaler=scaler)}
    scaler.update()
    assert all(math.isfinite(v) for v in logs.values())
    assert _changed(g0, _params(st.G))


def test_pretrain_learns_a_colour_cast():
    torch.manual_seed(0)
    x01 = 0.25 + 0.3 * torch.rand(8, 3, 8, 16)
    cast = torch.tensor([0.3, 0.0, -0.15]).view(1, 3, 1, 1)  # the target is redder and less blue
    x_s, x_t = normalize(x01[:4]), normalize(x01[4:] + cast)
    st = StyleTransfer(
        ngf=4, n_blocks=1, ndf=8, d_layers=1, nce_layers=(0, 4, 8, 12), num_patches=16, lr=1e-3
    )

    def mean_rgb(x):
        return denormalize(x).mean(dim=(0, 2, 3))

    def gap():
        with torch.no_grad():
            return (mean_rgb(st.translate(x_s)) - mean_rgb(x_t)).norm().item()

    before = gap()  # G ≈ 0 at init: a grey image
    for _ in range(30):
        logs = st.pretrain_step(x_s, x_t)
    assert all(math.isfinite(v) for v in logs.values())
    source_gap = (mean_rgb(x_s) - mean_rgb(x_t)).norm().item()  # doing nothing: ≈ 0.33
    assert gap() < 0.5 * min(before, source_gap)  # measured ≈ 0.03–0.08 over 5 seeds


# ---------------------------------------------------------------------------------------------
# figures


def test_plot_stylization_grid():
    from confeti.plots import plot_colour_shift, plot_stylization_grid

    x_s, x_t = _pair(b=3)
    fig = plot_stylization_grid(x_s, x_s + 0.1, x_t, n=2)
    assert len([ax for ax in fig.axes if ax.images]) == 6  # 2 rows × (source | stylized | target)
    fig = plot_colour_shift(x_s, x_s + 0.1, x_t)
    assert len(fig.axes) == 3


# ---------------------------------------------------------------------------------------------
# speed-ups that must not change the maths (issue 9)


def test_forward_with_layers_returns_the_encoder_outputs_of_the_same_pass():
    torch.manual_seed(0)
    G = Generator(ngf=4, n_blocks=2)
    x = torch.randn(2, 3, 16, 32)
    layers = (0, 2, 4, 8, 12)  # 2 = InstanceNorm output, overwritten by the in-place ReLU after it
    y, feats = G(x, layers)
    assert torch.equal(y, G(x))
    for got, want in zip(feats, G.encode(x, layers)):
        assert torch.equal(got, want)
    norm_out = G.model[:3](x)  # the InstanceNorm output before its ReLU
    assert torch.equal(feats[1], norm_out) and (feats[1] < 0).any()


def test_keys_from_translate_give_the_same_g_step_as_a_fresh_encoder_pass():
    torch.manual_seed(0)
    base = StyleTransfer(**TINY)
    x_s, x_t = _pair()
    runs = []
    for reuse in (False, True):
        st = copy.deepcopy(base)
        x_s2t, keys = st.translate_with_keys(x_s)
        assert all(not k.requires_grad for k in keys)
        torch.manual_seed(1)  # same patch positions in both runs
        logs = st.g_step(x_s, x_t, x_s2t, src_feats=keys if reuse else None)
        runs.append(({k: float(v) for k, v in logs.items()}, _params(st.G), _params(st.F)))
    (logs_a, g_a, f_a), (logs_b, g_b, f_b) = runs
    assert logs_a == pytest.approx(logs_b, rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g_a + f_a, g_b + f_b))


def test_d_step_on_one_concatenated_batch_equals_two_passes():
    torch.manual_seed(0)
    st = StyleTransfer(**TINY)
    x_s, x_t = _pair()
    fake = st.translate(x_s).detach()
    with torch.no_grad():
        d_fake, d_real = st.D(to_cut_range(fake)), st.D(to_cut_range(x_t))
        want = 0.5 * (lsgan_loss(d_fake, False) + lsgan_loss(d_real, True))
    assert st.d_step(fake, x_t)["loss_D"] == pytest.approx(want.item(), rel=1e-5)


def _cut_pass(st, x_s, x_t):
    """G with keys, D on [fake; real], F and PatchNCE; one backward of GAN + NCE + D losses."""
    x_s2t, keys = st.translate_with_keys(x_s)
    torch.manual_seed(1)  # the same patch positions in every layout
    nce = st._nce(st._cut(x_s), st._cut(x_s2t), keys)
    d = st.D(torch.cat([st._cut(x_s2t), st._cut(x_t)]))
    loss = nce + lsgan_loss(d[:2], True) + lsgan_loss(d[2:], False)
    loss.backward()
    grads = [[p.grad for p in net.parameters()] for net in (st.G, st.D, st.F)]
    return [x_s2t, *keys, d, nce], grads


def _assert_same_cut_pass(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    for x, y in zip(out_a, out_b):  # float rounding: ~1e-6 of each tensor's scale
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-5 * float(y.detach().abs().max()))
    for net_a, net_b in zip(grads_a, grads_b):  # G, D, F
        assert len(net_a) == len(net_b) and all(g is not None for g in net_a)
        # biases before an instance norm have a zero gradient in exact arithmetic: their float
        # noise is compared at the scale of the network's largest gradient (1e-4 of it: on an
        # AVX2-only CPU that noise reached 1.5e-5 of the scale; a layout bug is of order 1)
        scale = max(float(g.abs().max()) for g in net_b)
        for x, y in zip(net_a, net_b):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-4 * scale)


def test_cut_modules_give_the_same_outputs_and_gradients_in_both_layouts():
    """G/D/F in NCHW and in channels_last (as before: every instance norm copies to NCHW and
    the next convolution back) compute the same maths; G's output comes back in the caller's
    layout (the segmentor's) and G's features stay in G's."""
    torch.manual_seed(0)
    base = StyleTransfer(**{**TINY, "num_patches": 16})
    x_s, x_t = (x.contiguous(memory_format=torch.channels_last) for x in _pair(h=32, w=64))
    nhwc, nchw = copy.deepcopy(base), copy.deepcopy(base)
    nhwc.set_memory_format(torch.channels_last)
    nchw.set_memory_format(torch.contiguous_format)
    assert all(p.is_contiguous() for p in nchw.G.parameters())
    new, old = _cut_pass(nchw, x_s, x_t), _cut_pass(nhwc, x_s, x_t)
    assert all(f.is_contiguous() for f in new[0][1:-2])  # NCHW keys
    for run in (new, old):
        assert run[0][0].is_contiguous(memory_format=torch.channels_last)  # as x_s
    _assert_same_cut_pass(new, old)


def test_patch_sampler_gathers_the_same_patches_in_both_layouts():
    torch.manual_seed(0)
    F_ = PatchSampleMLP([3, 8], dim=16)
    feats = [torch.randn(2, 3, 8, 16), torch.randn(2, 8, 4, 8)]
    ids = [torch.randperm(128)[:10], torch.randperm(32)[:10]]
    want, _ = F_(feats, 10, ids)
    got, _ = F_([f.contiguous(memory_format=torch.channels_last) for f in feats], 10, ids)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    # the same rows as the official permute-then-index (B, H·W, C)[:, idx]
    flat = feats[1].permute(0, 2, 3, 1).flatten(1, 2)[:, ids[1]].flatten(0, 1)
    z = F_.mlps[1](flat)
    assert torch.allclose(want[1], z / (z.norm(dim=1, keepdim=True) + 1e-7), atol=1e-7)


def test_class_contrast_measures_a_thin_object_against_its_surroundings():
    from confeti.datasets import normalize
    from confeti.stylize import class_contrast

    rgb = torch.full((1, 3, 16, 16), 0.5)
    rgb[0, :, :, 7] = 1.0  # a white one-pixel pole on grey
    y = torch.zeros(1, 16, 16, dtype=torch.long)
    y[0, :, 7] = 5
    sums, counts = class_contrast(normalize(rgb), y)
    assert counts[5] == 1 and counts[0] == 1 and counts[2] == 0  # no building: not counted
    assert float(sums[5]) == pytest.approx(3**0.5 * 0.5, abs=1e-5)  # |(1,1,1) - (.5,.5,.5)|
    # a translation that smears the pole into the road keeps none of its contrast
    smeared = torch.full((1, 3, 16, 16), 0.5)
    sums2, _ = class_contrast(normalize(smeared), y)
    assert float(sums2[5]) == pytest.approx(0.0, abs=1e-5)
    # too few pixels: a class is skipped
    y2 = torch.zeros(1, 16, 16, dtype=torch.long)
    y2[0, 0, 7] = 5
    assert class_contrast(normalize(rgb), y2)[1][5] == 0
