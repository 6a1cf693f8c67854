"""Per-request NE-COCO settings: what a request may ask of an NE directory, checked once, named once.

A request says what it wants in vLLM's `SamplingParams.extra_args` (on the OpenAI server: the
`vllm_xargs` field), with flat keys because `vllm_xargs` holds scalars only:

    coco_edit   "ne" (the gate, default), "base" (no edit), or a named edit the directory carries
    coco_alpha  gate strength (0: exactly the base model)          } the gate's only;
    coco_beta   gate sharpness (> 0)                                } a request without them gets
    coco_lam    weight of the networked engagement, in [0, 1]      } the directory's values
    coco_scale  a named edit's strength (default 1: as exported; 0: exactly the base model), in
                [-1000, 1000]: gain 1 + scale·(gain - 1), offset scale·offset; named edits only

`Menu.parse` turns those into a `Setting` or raises a one-line ValueError naming the field and
the allowed values (the engine turns it into HTTP 400). `Menu.salt` names the prefix-cache
namespace of a setting: None for the directory's default, so default requests keep sharing KV
blocks with requests that say nothing. No torch and no vLLM here: the API server imports it to
validate, the scheduler to salt, the model runner to fill its per-token buffers.
"""

from __future__ import annotations

# Lazy imports: numpy is imported inside the functions that use it (directly or through the modules
# they import), so importing this module stays light.
import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from vllm_coco.core import names as N
from vllm_coco.core.errors import CocoError
from vllm_coco.core.names import BASE_EDIT, NE_EDIT, SALT_PREFIX, XARG_ALPHA, XARG_BETA, XARG_EDIT, XARG_LAM, XARGS


@dataclass(frozen=True)
class Setting:
    """One request's edit: `edit` is "ne", "base" or a named edit; alpha/beta/lam drive the gate
    (alpha is 0 for every edit but "ne"); `scale` is a named edit's strength (1 for "ne" and "base")."""

    edit: str
    alpha: float
    beta: float
    lam: float
    scale: float = 1.0


@dataclass(frozen=True)
class Menu:
    """What an NE directory offers a request: the gate's configured hyperparameters, its smallest
    and largest gate weights (bounding the strengths a request may ask for) and its named edits,
    in column order."""

    alpha: float
    beta: float
    lam: float
    w_min: float
    edits: tuple[str, ...] = ()
    w_max: float | None = None

    @classmethod
    def read(cls, ne_dir) -> Menu:
        from vllm_coco.core.ne_format import NEDirectory

        ne = NEDirectory.read(Path(ne_dir))
        c = ne.coco
        return cls(float(c["alpha"]), float(c["beta"]), float(c["lam"]), ne.w_min(), tuple(ne.edit_names), ne.w_max())

    @property
    def names(self) -> tuple[str, ...]:
        return (NE_EDIT, BASE_EDIT) + self.edits

    @property
    def default(self) -> Setting:
        return Setting(NE_EDIT, self.alpha, self.beta, self.lam)

    def parse(self, extra_args: dict | None) -> Setting:
        """The setting a request's extra_args ask for (the default when they hold no coco_* key).

        One strict schema, so admission refuses everything the scheduler and the runner could not
        take: keys case-exact (any key that reads as coco* in another spelling is refused, never
        ignored), numbers JSON numbers or plain decimal strings (no bools, no `1_0`), ranges
        checked in the float32 the model computes with (core.checks.ne_hyper)."""
        args = {k: v for k, v in (extra_args or {}).items() if looks_coco(k)}
        if not args:
            return self.default
        unknown = sorted(set(args) - set(XARGS), key=str)
        if unknown:
            raise ValueError(f"unknown NE-COCO setting {_short(unknown[0])}; allowed keys (exact spelling): "
                             f"{', '.join(XARGS)}")
        edit = args.get(XARG_EDIT, NE_EDIT)
        if not isinstance(edit, str) or edit not in self.names:
            raise ValueError(f"{XARG_EDIT} {_short(edit)} is not an edit of this model; allowed: "
                             f"{', '.join(self.names)}")
        if N.XARG_SCALE in args and edit not in self.edits:
            raise ValueError(f"{N.XARG_SCALE} applies to named edits, not to {XARG_EDIT} {edit!r}; pick one with "
                             f"{XARG_EDIT} ({', '.join(self.edits) or 'this model carries none'}) or drop it")
        gate = [k for k in (XARG_ALPHA, XARG_BETA, XARG_LAM) if k in args]
        if edit != NE_EDIT:
            if gate:
                raise ValueError(f"{gate[0]} applies to the gate ({XARG_EDIT} {NE_EDIT!r}), not to {XARG_EDIT} "
                                 f"{edit!r}; drop it or pick {NE_EDIT!r}")
            return Setting(edit, 0.0, self.beta, self.lam, _scale(args))
        alpha, beta, lam = (_number(args, k, d) for k, d in ((XARG_ALPHA, self.alpha), (XARG_BETA, self.beta),
                                                             (XARG_LAM, self.lam)))
        from vllm_coco.core.checks import ne_hyper

        try:
            ne_hyper(alpha, beta, lam, self.w_min, (XARG_ALPHA, XARG_BETA, XARG_LAM), w_max=self.w_max)
        except CocoError as exc:
            raise ValueError(str(exc)) from None
        return Setting(NE_EDIT, alpha, beta, lam)

    def salt(self, setting: Setting, client: str | None = None) -> str | None:
        """The prefix-cache salt a request runs under: its setting folded with the salt its client
        sent (`cache_salt`). The KV of a prompt depends on the setting (v channels are gated), so
        requests with different settings must never share blocks, whatever salt a client sends.

        None when the request is at the directory's default and sent no salt: such requests keep
        sharing KV blocks with requests that say nothing. Every other request gets "coco:" + a
        hash of (client salt, canonical setting); since a client's own salt is always hashed too,
        no salt a client can send equals the namespace of another setting (it would need a
        sha256 preimage). Equal settings (in float32) with equal client salts hash equal.

        A named edit's canonical form carries its scale (scale 1 given or not: one setting, one
        salt). A named edit at scale 0 computes what "base" does, yet salts apart from it: the
        canonical form names what was asked, and the cost is only KV blocks not shared."""
        if setting == self.default and client is None:
            return None
        canon = "" if setting == self.default else \
            f"{setting.edit}|{_f32(setting.alpha)}|{_f32(setting.beta)}|{_f32(setting.lam)}"
        if setting.edit in self.edits:
            canon += f"|{_f32(setting.scale)}"
        key = json.dumps([client, canon])  # unambiguous: no separator a client salt could imitate
        return SALT_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:32]

    def columns(self, setting: Setting) -> tuple[float, float, float, int, float]:
        """(alpha, beta, lam, named-edit column or -1, its scale) for the model's per-token buffers:
        the runner writes the scale into that column of `on`, which the named edit multiplies by."""
        col = self.edits.index(setting.edit) if setting.edit in self.edits else -1
        return setting.alpha, setting.beta, setting.lam, col, setting.scale


@lru_cache(maxsize=8)
def menu_of(ne_dir: str) -> Menu:
    """The Menu of an NE directory, read once per process."""
    return Menu.read(ne_dir)


# A number a request may spell as a string: plain decimal, optional exponent (no `1_0`, no "nan").
_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def looks_coco(key) -> bool:
    """Whether a key is meant for us: any spelling of coco* (COCO_ALPHA, coco-alpha) counts, so a
    misspelt key is refused instead of silently serving the default."""
    return isinstance(key, str) and key.lower().lstrip().startswith("coco")


def _short(value) -> str:
    """A request's value in a one-line message: repr, on one line, at most 40 characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 40 else text[:37] + "..."


def _number(args: dict, key: str, default: float) -> float:
    v = args.get(key, default)
    if isinstance(v, str) and _DECIMAL.fullmatch(v.strip()):
        v = v.strip()
    elif isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{key} {_short(v)} is not a number; pass a JSON number such as 0.5")
    try:
        f = float(v)
    except OverflowError:  # an integer of hundreds of digits
        f = math.inf
    if not math.isfinite(f) or abs(f) > N.F32_MAX:
        raise ValueError(f"{key} {_short(v)} is not a finite float32 number; pass a number such as 0.5")
    return f


def _scale(args: dict) -> float:
    """A named edit's coco_scale (1 when absent): a number within [-SCALE_MAX, SCALE_MAX] (core/names.py)."""
    s = _number(args, N.XARG_SCALE, 1.0)
    if abs(s) > N.SCALE_MAX:
        raise ValueError(f"{N.XARG_SCALE} {_short(args[N.XARG_SCALE])} is outside [-{N.SCALE_MAX:g}, {N.SCALE_MAX:g}]; "
                         "pass a strength such as 0.5 (1: the edit as exported, 0: the base model)")
    return s + 0.0  # -0.0 becomes 0.0: equal settings salt alike


def _f32(x: float) -> str:
    """The float32 the model computes with, spelled exactly: 0.1 and 0.10000000001 salt alike."""
    return struct.pack("<f", x).hex()
