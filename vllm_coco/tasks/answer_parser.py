"""Free-form generations -> the option they name (the stereo_coco_gen tasks).

`parse_answer(text, choices, unknown)` returns a displayed option position or None; None is
counted as unparsed (`unparsed_rate`) and as a failure, never dropped.
"""

from __future__ import annotations

import re

_UNKNOWN_PHRASES = (
    r"can ?not be determined", r"can't be determined", r"cannot be known", r"can't be known",
    r"cannot determine", r"can't determine", r"cannot be answered", r"can't be answered",
    r"cannot answer", r"can't answer", r"cannot tell", r"can't tell", r"cannot say", r"can't say",
    r"not enough info(rmation)?", r"insufficient info(rmation)?", r"not enough context",
    r"not answerable", r"unanswerable", r"undetermined", r"not known", r"unknown",
    r"impossible to (tell|say|know|determine)", r"no way to (tell|know)", r"(is|are) not (stated|specified|mentioned)",
    r"does(n't| not) (say|specify|mention)", r"unclear", r"not clear",
)
_UNKNOWN_RE = re.compile(r"\b(" + "|".join(_UNKNOWN_PHRASES) + r")\b")
# a bare letter, optionally "Option"/"Answer:"-prefixed and bracketed: "B", "(b)", "Option C.", "Answer: A"
_LETTER_RE = re.compile(r"^\s*(?:(?:the\s+)?(?:answer|option)(?:\s+is)?\s*:?\s*)?\(?([abc])\)?[.):]?\s*$", re.I)


def _norm_text(s: str) -> str:
    s = s.lower().replace("’", "'")
    s = re.sub(r"[^a-z0-9' ]+", " ", s)
    return re.sub(r"\s+", " ", s).strip()


def _strip_article(s: str) -> str:
    return re.sub(r"^(the|a|an) ", "", s)


def parse_answer(text: str, choices: list[str], unknown: int) -> int | None:
    """Map a free-form answer to a displayed option position, or None when it names no option.

    In order: the answer is exactly an option; it starts with an option; it is a bare letter
    (A/B/C, "(b)", "Option C" - letters count in displayed order); it uses an "unknown"-style
    phrase ("cannot be determined", "not enough information", ...); it mentions exactly one
    option, or several, in which case the earliest mention wins. Empty or unmatched: None.
    """
    ans = _norm_text(text or "")
    if not ans:
        return None
    opts = [_norm_text(c) for c in choices]
    bare = [_strip_article(o) for o in opts]
    ans_bare = _strip_article(ans)
    for i, (o, b) in enumerate(zip(opts, bare)):
        if ans in (o, b) or ans_bare in (o, b):
            return i
    starts = [i for i, (o, b) in enumerate(zip(opts, bare))
              if re.match(rf"(the |a |an )?{re.escape(b)}\b", ans)]
    if len(starts) == 1:
        return starts[0]
    if len(starts) > 1:  # one option is a prefix of another: the longest match is the one named
        return max(starts, key=lambda i: len(bare[i]))
    m = _LETTER_RE.match(text)
    if m:
        return "abc".index(m.group(1).lower())
    if _UNKNOWN_RE.search(ans):
        return unknown
    hits = {}
    for i, b in enumerate(bare):
        m = re.search(rf"\b{re.escape(b)}\b", ans) if b else None
        if m:
            hits[i] = m.start()
    if hits:
        return min(hits, key=lambda i: (hits[i], -len(bare[i])))
    return None
