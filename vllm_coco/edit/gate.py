"""The NE-COCO gate (docs/METHOD.md §7.3): the one implementation shared by the Hugging Face
reference and the vLLM model.

    z = (|h_S| - mu) / sigma          standardized intensity, per token
    e = sign(w) * z                   engagement: > 0 on the unbiased side
    m = (1 - lam) * e + lam * W_hat e networked engagement
    g = 1 + alpha * w * logistic(beta * m)
    h_S <- h_S * g

Pure torch, shape-static (index_select / index_copy, no boolean masks), no host synchronisation,
so it traces under torch.compile and is safe inside CUDA graphs. `alpha`, `beta` and `lam` may be
per-token tensors [tokens, 1] (per-request settings in a mixed batch) or floats.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def ne_gain(h_sel: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, w: torch.Tensor,
            w_hat: torch.Tensor, alpha, beta, lam,
            gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Gain g for the selected channels. h_sel: [tokens, S]; mu, sigma, w: [S]; w_hat: [S, S];
    alpha, beta, lam: floats or [tokens, 1]. Returns [tokens, S] (float32 or wider).

    Under tensor parallelism a rank holds S_r of the channels: `gather` maps its engagement
    [tokens, S_r] to every rank's [tokens, C] (an all-gather, see sharding.py) and w_hat is then
    this rank's rows over those columns, [S_r, C].
    """
    z = (h_sel.float().abs() - mu) / sigma  # [tokens, S]
    e = torch.sign(w) * z  # [tokens, S]
    e_all = e if gather is None else gather(e)  # [tokens, C]
    m = (1.0 - lam) * e + lam * (e_all @ w_hat.t())  # [tokens, S]; (W_hat e)_i = Σ_j W_hat[i, j] e_j
    return 1.0 + alpha * w * torch.sigmoid(beta * m)


def apply_gate(x: torch.Tensor, channels: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
               w: torch.Tensor, w_hat: torch.Tensor, alpha, beta, lam,
               gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """x: [..., width] (the packed [q | k | v] projection output); channels: [S] int64 indices into
    the last dim. Returns x with the selected channels scaled by the gain (out of place)."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])  # [tokens, width]
    sel = flat.index_select(1, channels)  # [tokens, S]
    gain = ne_gain(sel, mu, sigma, w, w_hat, alpha, beta, lam, gather)
    return flat.index_copy(1, channels, (sel.float() * gain).to(x.dtype)).reshape(shape)
