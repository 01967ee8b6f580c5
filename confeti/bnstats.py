"""BatchNorm statistics re-estimated on one domain (AdaBN): a training-free baseline.

A segmentor trained on the source normalises every layer with the source's running mean and
variance. AdaBN (Li et al., 2016) keeps every weight and only re-estimates those statistics on
unlabelled target images: what is left of the domain gap after that is what the weights
themselves get wrong. Here it is a diagnostic of a finished run (``python -m confeti eval
--bn-stats target``): on ToyStreets it tells how much of the gap is global image statistics.

For every BatchNorm layer, over the n batches of the chosen domain (training crops, no labels):

    mu = mean over batches of E_batch[x],   sigma^2 = mean over batches of Var_batch[x]

(PyTorch's cumulative average, ``momentum=None``); the weights are not touched.
Shape: batches of (B, 3, H, W) images -> the model, its BatchNorm buffers replaced.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches) -> int:
    """Replace every BatchNorm layer's running statistics by their average over ``batches``.

    The model ends in eval mode with each layer's momentum as it was. Returns the number of
    batches used. Shape: each batch (B, 3, H, W).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ValueError("the model has no BatchNorm layer: nothing to re-estimate")
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts alike
    model.eval()
    for m in bns:
        m.train()  # only the BatchNorm layers use (and record) batch statistics
    n = 0
    try:
        for x in batches:
            model(x)
            n += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    if n == 0:
        raise ValueError("no batch to re-estimate the BatchNorm statistics from")
    return n
