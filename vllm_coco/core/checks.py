"""One validation of numbers at every boundary: CLI options, config values, artifact arrays,
NE hyperparameters and the tensors an edit writes. Each failure is a CocoError naming the value
and the fix, so nothing non-finite ever reaches a model or a file."""

from __future__ import annotations

# Lazy imports: torch is imported inside the functions that use it (directly or through the modules
# they import), so importing this module stays light.
import math

import numpy as np

from vllm_coco.core.errors import CocoError
from vllm_coco.core.names import F32_MAX


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


# Bounds of the NE gate's effective numbers (docs/METHOD.md §7.3), in the float32 the gate computes in.
# The largest gain 1 + alpha*w a gate or LE factor may reach. A steering edit scales a neuron by a
# small factor (the defaults give at most 2, the sweeps at most 3); 1e3 is far past any of them, yet
# keeps a scaled activation of a float16 model (|h| up to ~65) inside float16, and a float32 one
# 35 orders of magnitude away from overflow: a larger gain is a typo, not an experiment.
GAIN_MAX = 1e3
# The largest gate sharpness. logistic(beta*m) is a step at float32 resolution once |beta*m| > 17,
# so beyond 1e4 a larger beta changes nothing but how close to overflow beta*m runs.
BETA_MAX = 1e4
# The largest standardized distance |mu|/sigma a gate may hold: the engagement z of a zero
# activation. Real statistics stay below 1e7 (mu of q/k/v outputs < 1e3, sigma floored at 1e-6);
# 1e12 leaves z = (|h| - mu)/sigma finite in float32 for any activation below 1e26, so W_hat e
# never meets an infinity (0 * inf is NaN).
Z_MAX = 1e12


def finite32(value, what: str) -> float:
    """`value` as a float if it is finite in float32 (|v| <= 3.4e38); CocoError naming `what` if not."""
    v = finite(value, what)
    if abs(v) > F32_MAX:
        raise CocoError(f"{what} {v:g} is not a finite float32 number (|v| > {F32_MAX:.3g}); pass a finite value")
    return v


def ne_hyper(alpha: float, beta: float, lam: float, w_min: float,
             names: tuple[str, str, str] = ("--alpha", "--beta", "--lam"), *, w_max: float | None = None) -> None:
    """The NE gate's hyperparameters are usable: finite in float32, lam in [0, 1], 0 < beta <= BETA_MAX,
    and every gate factor 1 + alpha*w*logistic(.) in [0, GAIN_MAX] for w in [w_min, w_max] (w_min: the
    smallest gate weight; w_max: the largest, 1 when not given, the largest weight identify makes).
    CocoError naming the offending setting by `names` (CLI flags, or a request's keys) if not."""
    for name, v in zip(names, (alpha, beta, lam)):
        finite32(v, name)
    if not 0 <= lam <= 1:
        raise CocoError(f"{names[2]} {lam} is outside [0, 1]")
    if beta <= 0:
        raise CocoError(f"{names[1]} {beta} must be positive")
    if beta > BETA_MAX:
        raise CocoError(f"{names[1]} {beta:g} is above {BETA_MAX:g}: the logistic is a step function long before "
                        "that; pass a sharpness such as 2")
    w_max = 1.0 if w_max is None else float(w_max)
    ends = (alpha * w_min, alpha * w_max)  # alpha*w is linear in w: its extremes sit at the weights' ends
    if 1 + min(0.0, *ends) < 0:
        raise CocoError(f"{names[0]} {alpha} can make a gate factor 1 + alpha*w*logistic(.) negative; "
                        "choose an alpha with 1 + alpha*w >= 0 for every weight")
    if 1 + max(0.0, *ends) > GAIN_MAX:
        raise CocoError(f"{names[0]} {alpha:g} can make a gate factor 1 + alpha*w*logistic(.) exceed {GAIN_MAX:g} "
                        f"(weights up to {max(abs(w_min), abs(w_max)):.3g}); choose a strength such as 1")


def ne_gate(gate: dict, what: str, fix: str) -> None:
    """One layer's gate tensors (numpy or torch, core/ne_format.GATE_KEYS) hold what the gate can
    compute with: channels int64; mu, sigma, w, w_hat float32 and finite; mu >= 0, sigma > 0 and
    |mu|/sigma <= Z_MAX; w in [-1, 1]; w_hat in [0, 1] with rows summing to at most 1 (so
    |W_hat e| <= max |e|). CocoError "`what`: ...; `fix`" if not."""
    for k, want in (("channels", "int64"), ("mu", "float32"), ("sigma", "float32"), ("w", "float32"),
                    ("w_hat", "float32")):
        dtype = str(gate[k].dtype).removeprefix("torch.")  # numpy and torch spell these alike
        if dtype != want:
            raise CocoError(f"{what}: {k} is {dtype}, not {want}; {fix}")
    a = {k: np.asarray(v) for k, v in gate.items()}
    if a["mu"].size == 0:  # a layer without channels has no gate
        return
    for k in ("mu", "sigma", "w", "w_hat"):
        finite_array(a[k], f"{what}: {k}", fix)
    mu, sigma, w, w_hat = (a[k].astype(np.float64) for k in ("mu", "sigma", "w", "w_hat"))
    problem = ("mu is negative (it is a mean of |h|)" if (mu < 0).any()
               else "sigma is not positive" if (sigma <= 0).any()
               else f"mu/sigma reaches {np.max(mu / sigma):.3g}, above {Z_MAX:g}" if np.max(mu / sigma) > Z_MAX
               else "w is outside [-1, 1]" if (np.abs(w) > 1).any()
               else "w_hat is outside [0, 1]" if ((w_hat < 0) | (w_hat > 1)).any()
               else "a row of w_hat sums to more than 1" if (w_hat.sum(1) > 1 + 1e-4).any()
               else None)
    if problem:
        raise CocoError(f"{what}: {problem}; {fix}")


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
