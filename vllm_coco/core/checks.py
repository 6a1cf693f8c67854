"""One validation of numbers at every boundary: CLI options, config values, artifact arrays,
NE hyperparameters and the tensors an edit writes. Each failure is a CocoError naming the value
and the fix, so nothing non-finite ever reaches a model or a file."""

from __future__ import annotations

import math

import numpy as np

from vllm_coco.core.errors import CocoError


def finite(value, what: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """`value` as a float if it is a finite number within the bounds; CocoError naming `what` if not."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CocoError(f"{what} {value!r} is not a number") from None
    except OverflowError:  # an integer too large for a float
        raise CocoError(f"{what} {str(value)[:20]}... is not a finite number; pass a finite value") from None
    if not math.isfinite(v):
        raise CocoError(f"{what} {value} is not a finite number; pass a finite value")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise CocoError(f"{what} {v} must be {'greater than' if lo_open else 'at least'} {lo}")
    if hi is not None and v > hi:
        raise CocoError(f"{what} {v} must be at most {hi}")
    return v


def ne_hyper(alpha: float, beta: float, lam: float, w_min: float,
             names: tuple[str, str, str] = ("--alpha", "--beta", "--lam")) -> None:
    """The NE gate's hyperparameters are usable: finite, lam in [0, 1], beta > 0, and no gate factor
    1 + alpha*w*logistic(.) can turn negative (w_min: the smallest gate weight). CocoError naming
    the offending setting by `names` (CLI flags, or a request's keys) if not."""
    for name, v in zip(names, (alpha, beta, lam)):
        finite(v, name)
    if not 0 <= lam <= 1:
        raise CocoError(f"{names[2]} {lam} is outside [0, 1]")
    if beta <= 0:
        raise CocoError(f"{names[1]} {beta} must be positive")
    if 1 + min(0.0, alpha * w_min) < 0 or 1 + alpha < 0:
        raise CocoError(f"{names[0]} {alpha} can make a gate factor 1 + alpha*w*logistic(.) negative; "
                        "choose an alpha with 1 + alpha*w >= 0 for every weight")


def finite_array(arr: np.ndarray, what: str, fix: str, allow: str = "") -> None:
    """Every element of `arr` is a real number, finite unless `allow` names an infinity that the
    array may carry ("+inf": the loss of a constant neuron, "-inf": its score)."""
    a = np.asarray(arr)
    if a.dtype.kind not in "iuf" and a.size:
        raise CocoError(f"{what} has dtype {a.dtype}, not numbers; {fix}")
    if a.dtype.kind != "f":
        return
    bad = np.isnan(a)
    if "+inf" not in allow:
        bad |= np.isposinf(a)
    if "-inf" not in allow:
        bad |= np.isneginf(a)
    if bad.any():
        first = int(np.flatnonzero(bad.reshape(-1))[0])
        raise CocoError(f"{what} holds {int(bad.sum())} non-finite value(s) (first at {first}: "
                        f"{a.reshape(-1)[first]}); {fix}")


def tensors_finite(tensors: dict, what: str,
                   fix: str = "the edit overflows the weights' dtype: use a smaller strength") -> None:
    """Every floating tensor in `tensors` (torch or numpy) is finite: the last check before an edit
    writes, and the first after a gate is read."""
    import torch

    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            bad = t.is_floating_point() and not bool(torch.isfinite(t).all())
        else:
            bad = np.asarray(t).dtype.kind == "f" and not np.isfinite(t).all()
        if bad:
            raise CocoError(f"{what}: non-finite values in {name}; {fix}")
