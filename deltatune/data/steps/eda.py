"""EDA (Wei & Zou, EMNLP 2019) for ``deltatune data augment``: label-keeping variants of every row.

The four operations are those of the official ``code/eda.py`` (jasonwei20/eda_nlp@04ab29c), with
n = max(1, ⌊α·#words⌋):

- SR, synonym replacement: the distinct non-stop-words in random order; each one that has synonyms is
  replaced, at **every** occurrence, by one of them picked at random, until n words were replaced (so more
  than n tokens may change, as in the original);
- RI, random insertion: n times, a random word that has synonyms (at most 10 tries, else that insertion is
  skipped) has its first synonym inserted at a random position;
- RS, random swap: n times, two random positions are swapped (a second position equal to the first is drawn
  again, at most 3 times);
- RD, random deletion: each word is dropped with probability p; at least one word stays, and a one-word
  sentence is left as it is.

``eda()`` builds ⌊num_aug/4⌋+1 sentences per operation whose α is above 0, shuffles them, keeps ``num_aug`` (a
``num_aug`` below 1 is the expected number kept: each is kept with probability num_aug / their count) and
appends the original. Every draw comes from one ``random.Random(seed)`` per run: the original seeds Python's
global generator once at import (``random.seed(1)``), which makes every run identical whatever the seed.

Synonyms. WordNet cannot be downloaded here, so a word's synonyms are its nearest neighbours by cosine in an
embedding table (the spec's "synonym replacement without WordNet"): by default the input embeddings of the
encoder ``encoder`` (the shipped ``minilm-l6``), restricted to whole-word tokens (WordPiece tokens without
``##``, or BPE / SentencePiece tokens that start a word) of at least 3 ASCII letters. A word's synonyms are
the ``neighbours`` most similar such words whose cosine is at least ``min_similarity``, leaving out:

- stop words (EDA's list, below): a stop word is never replaced, inserted or offered as a synonym;
- the word's own inflections (a neighbour sharing a prefix with it that covers all but at most two letters of
  the shorter one: movie / movies, happy / happily), which distributional neighbours rank first;
- antonyms (a built-in list of common polarity pairs, ``ANTONYMS``, and the word with a negating prefix:
  happy / unhappy), since distributional neighbours include them (good → bad, terrible → terrific) and would
  flip sentiment labels.

Choices the spec leaves open, and why:

- ``min_similarity`` defaults to 0.45, below the 0.6-0.7 the spec gives for GloVe / fastText: MiniLM's input
  embeddings are less peaked. Measured on them: good → excellent 0.58, great 0.52, better 0.49; happy →
  pleased 0.49, glad 0.45; tired → exhausted 0.56, weary 0.51; movie → film 0.71. At 0.6 most words have no
  synonym.
- The synonyms are lower-case single words, so a word is never replaced by a phrase (WordNet's multi-word
  lemmas have no counterpart). With ``clean: false`` only purely alphabetic tokens are looked up (lower-cased;
  a capitalised word gets a capitalised synonym).
- ``clean`` (default true) is EDA's ``get_only_chars``: lower case, letters and single spaces only, applied to
  the original and to every variant, and the original row is written cleaned too, as EDA does. That strips
  digits, punctuation and case, which harms tasks that need them (the spec's pitfall): ``clean: false`` edits
  the whitespace-separated tokens of the text as it is and writes the original row unchanged.
- Output rows: per pool row, its variants and then the original (EDA's order), each a copy of the row with the
  new text, ``parent`` (the row's index in the pool) and ``augmented`` (false for the original). A row with no
  word (empty after cleaning) is written once, without variants. Variants identical to their original are
  kept, as EDA keeps them; the manifest counts them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from deltatune.data.steps._base import Outcome, Pool, Progress, no_progress
from deltatune.data.steps._embed import DEFAULT_ENCODER
from deltatune.errors import DeltatuneError

# the stop words of the official eda.py (NLTK's English list), never replaced
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers
herself it its itself they them their theirs themselves what which who whom this that these those am is are
was were be been being have has had having do does did doing a an the and but if or because as until while of
at by for with about against between into through during before after above below to from up down in out on
off over under again further then once here there when where why how all any both each few more most other
some such no nor not only own same so than too very s t can will just don should now
""".split()) | {""}

# common polarity pairs that embedding neighbours rank high (good ~ bad): a synonym is never a word's antonym
ANTONYMS: tuple[tuple[str, str], ...] = (
    ("good", "bad"), ("better", "worse"), ("best", "worst"), ("great", "terrible"), ("great", "awful"),
    ("excellent", "terrible"), ("excellent", "awful"), ("excellent", "poor"), ("wonderful", "terrible"),
    ("wonderful", "awful"), ("amazing", "awful"), ("amazing", "terrible"), ("awesome", "awful"),
    ("terrific", "terrible"), ("terrific", "horrible"), ("fantastic", "terrible"), ("nice", "nasty"),
    ("love", "hate"), ("loved", "hated"), ("loves", "hates"), ("loving", "hating"), ("lover", "hater"),
    ("like", "dislike"), ("liked", "disliked"), ("happy", "sad"), ("happiness", "sadness"), ("glad", "sad"),
    ("joy", "sorrow"), ("positive", "negative"), ("right", "wrong"), ("correct", "wrong"), ("true", "false"),
    ("win", "lose"), ("won", "lost"), ("wins", "losses"), ("winner", "loser"), ("winning", "losing"),
    ("success", "failure"), ("succeed", "fail"), ("pass", "fail"), ("beautiful", "ugly"), ("pretty", "ugly"),
    ("easy", "hard"), ("easy", "difficult"), ("fast", "slow"), ("quick", "slow"), ("quickly", "slowly"),
    ("strong", "weak"), ("rich", "poor"), ("high", "low"), ("hot", "cold"), ("warm", "cold"),
    ("big", "small"),
    ("large", "small"), ("long", "short"), ("old", "new"), ("old", "young"), ("open", "closed"),
    ("increase", "decrease"), ("rise", "fall"), ("gain", "loss"), ("agree", "disagree"), ("accept", "reject"),
    ("friend", "enemy"), ("safe", "dangerous"), ("clean", "dirty"), ("full", "empty"), ("light", "dark"),
    ("early", "late"), ("always", "never"), ("everything", "nothing"), ("everyone", "nobody"), ("yes", "no"),
    ("calm", "angry"), ("cheap", "expensive"), ("interesting", "boring"), ("exciting", "boring"),
    ("fun", "boring"), ("hero", "villain"), ("smart", "stupid"), ("support", "oppose"),
    ("praise", "criticism"),
    ("peace", "war"), ("alive", "dead"), ("life", "death"), ("heaven", "hell"), ("comedy", "tragedy"),
    ("optimistic", "pessimistic"), ("pleasant", "awful"), ("kind", "cruel"), ("honest", "dishonest"),
    ("best", "bad"), ("good", "worst"), ("good", "worse"), ("bad", "better"), ("bad", "best"),
)
NEGATING_PREFIXES = ("un", "in", "im", "ir", "il", "dis", "non")

Synonyms = Callable[[str], list[str]]  # a lower-case word -> its synonyms, most similar first


# ---------------------------------------------------------------- EDA's text cleaning


def get_only_chars(line: str) -> str:
    """EDA's cleaning: apostrophes dropped, hyphens / tabs / newlines to spaces, lower case, every other
    character that is not a-z or a space to a space, runs of spaces to one, no leading space."""
    line = line.replace("'", "").replace("-", " ").replace("\t", " ").replace("\n", " ").lower()
    clean = "".join(c if c in "qwertyuiopasdfghjklzxcvbnm " else " " for c in line)
    return re.sub(" +", " ", clean).lstrip(" ")


# ---------------------------------------------------------------- synonyms from embedding neighbours


def _inflection(a: str, b: str) -> bool:
    """``a`` and ``b`` look like forms of one word: a shared prefix covering all but at most two letters of
    the shorter one (and at least 3 letters)."""
    shared = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        shared += 1
    return shared >= max(3, min(len(a), len(b)) - 2)


def _antonym_set(pairs: Iterable[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    return frozenset({(a, b) for a, b in pairs} | {(b, a) for a, b in pairs})


def _negation(a: str, b: str) -> bool:
    """One word is the other with a negating prefix (happy / unhappy, like / dislike)."""
    return any(a == p + b or b == p + a for p in NEGATING_PREFIXES)


def _whole_words(vocab: dict[str, int]) -> dict[str, int]:
    """The whole-word tokens of a tokenizer vocabulary (word -> token id): WordPiece tokens without ``##``, or
    the word-initial tokens of a BPE (``Ġ``) / SentencePiece (``▁``) vocabulary, of at least 3 ASCII letters,
    lower-cased (the lowest id wins among casings)."""
    markers = ("Ġ", "▁")
    word_start = next((m for m in markers if any(t.startswith(m) for t in vocab)), None)
    out: dict[str, int] = {}
    for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if word_start is not None:
            if not token.startswith(word_start):
                continue
            token = token[len(word_start):]
        elif token.startswith("##"):
            continue
        word = token.lower()
        if len(word) >= 3 and word.isascii() and word.isalpha() and word not in out:
            out[word] = i
    return out


class Neighbours:
    """Synonyms from an embedding table: a word's ``k`` nearest words by cosine, at least ``min_similarity``,
    never a stop word, one of its inflections or an antonym (module docstring). Computed once per word
    (``prepare`` does many words in one matrix product)."""

    def __init__(self, words: list[str], vectors: torch.Tensor, *, k: int = 10, min_similarity: float = 0.45,
                 stop_words: Iterable[str] = STOP_WORDS,
                 antonyms: Iterable[tuple[str, str]] = ANTONYMS) -> None:
        if len(words) != vectors.shape[0]:
            raise DeltatuneError(f"Neighbours: {len(words)} words but {vectors.shape[0]} vectors")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.vectors = torch.nn.functional.normalize(vectors.detach().float(), dim=-1)
        self.k, self.min_similarity = k, min_similarity
        self.stop_words = frozenset(stop_words)
        self.antonyms = _antonym_set(antonyms)
        self._found: dict[str, list[str]] = {}

    @classmethod
    def from_encoder(cls, encoder: str = DEFAULT_ENCODER, **kwargs: Any) -> Neighbours:
        """The whole-word rows of ``encoder``'s input embedding table (a shipped name or a local folder)."""
        from deltatune.data import models

        model = models.load(encoder, task="encoder")
        words = _whole_words(models.load_tokenizer(encoder).get_vocab())
        table = model.get_input_embeddings().weight.detach()
        ids = torch.tensor(list(words.values()), dtype=torch.long)
        if not words or int(ids.max()) >= table.shape[0]:
            raise DeltatuneError(f"the encoder {encoder!r} has no whole-word tokens in its embedding table "
                                 "to take synonyms from; name another encoder (a WordPiece model such as "
                                 "minilm-l6)")
        return cls(list(words), table[ids], **kwargs)

    def allowed(self, word: str, other: str) -> bool:
        """``other`` may stand for ``word``."""
        return not (other == word or other in self.stop_words or _inflection(word, other)
                    or (word, other) in self.antonyms or _negation(word, other))

    def prepare(self, words: Iterable[str], progress: Progress = no_progress, chunk: int = 256) -> None:
        """Find the synonyms of many words at once (one matrix product per ``chunk`` of them)."""
        todo = sorted({w for w in words if w not in self._found})
        known = [w for w in todo if w in self.index and w not in self.stop_words]
        for w in todo:
            if w not in self.index or w in self.stop_words:
                self._found[w] = []
        # extra candidates: the filters drop some of the nearest (inflections first)
        take = min(len(self.words), 4 * self.k + 8)
        for start in range(0, len(known), chunk):
            part = known[start:start + chunk]
            rows = self.vectors[torch.tensor([self.index[w] for w in part])]
            sims, idx = (rows @ self.vectors.T).topk(take, dim=-1)
            for w, s_row, i_row in zip(part, sims.tolist(), idx.tolist(), strict=True):
                found = []
                for s, i in zip(s_row, i_row, strict=True):
                    if s < self.min_similarity or len(found) == self.k:
                        break
                    if self.allowed(w, self.words[i]):
                        found.append(self.words[i])
                self._found[w] = found
            progress("synonyms", min(start + chunk, len(known)), len(known))

    def __call__(self, word: str) -> list[str]:
        if word not in self._found:
            self.prepare([word])
        return list(self._found[word])


def no_synonyms(word: str) -> list[str]:
    """The synonym source when neither SR nor RI runs."""
    return []


def cased(synonyms: Synonyms) -> Synonyms:
    """Synonyms of raw tokens (``clean: false``): only purely alphabetic tokens are looked up, lower-cased; a
    capitalised token gets capitalised synonyms."""
    def lookup(token: str) -> list[str]:
        if not token.isalpha():
            return []
        found = synonyms(token.lower())
        return [s.capitalize() for s in found] if token[0].isupper() else found

    return lookup


# ---------------------------------------------------------------- the four operations (eda.py's)


def synonym_replacement(words: list[str], n: int, synonyms: Synonyms, rng: random.Random) -> list[str]:
    """SR: up to n distinct non-stop-words replaced, each at every occurrence, by a random synonym."""
    new_words = words.copy()
    # sorted: a set's order is not seeded (string hashes differ between processes)
    candidates = sorted({w for w in words if w.lower() not in STOP_WORDS})
    rng.shuffle(candidates)
    replaced = 0
    for word in candidates:
        found = synonyms(word)
        if found:
            synonym = rng.choice(found)
            new_words = [synonym if w == word else w for w in new_words]
            replaced += 1
        if replaced >= n:
            break
    return " ".join(new_words).split(" ")  # as eda.py: a synonym with a space becomes two words


def random_insertion(words: list[str], n: int, synonyms: Synonyms, rng: random.Random) -> list[str]:
    """RI: n times, the first synonym of a random word that has one inserted at a random position."""
    new_words = words.copy()
    for _ in range(n):
        _add_word(new_words, synonyms, rng)
    return new_words


def _add_word(new_words: list[str], synonyms: Synonyms, rng: random.Random) -> None:
    found: list[str] = []
    tries = 0
    while not found:
        found = synonyms(new_words[rng.randint(0, len(new_words) - 1)])
        tries += 1
        if tries >= 10:
            return
    new_words.insert(rng.randint(0, len(new_words) - 1), found[0])


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    """RS: n swaps of two random positions."""
    new_words = words.copy()
    for _ in range(n):
        new_words = _swap_word(new_words, rng)
    return new_words


def _swap_word(new_words: list[str], rng: random.Random) -> list[str]:
    first = rng.randint(0, len(new_words) - 1)
    second = first
    tries = 0
    while second == first:
        second = rng.randint(0, len(new_words) - 1)
        tries += 1
        if tries > 3:
            return new_words
    new_words[first], new_words[second] = new_words[second], new_words[first]
    return new_words


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    """RD: each word dropped with probability p; one random word stays when all would go."""
    if len(words) == 1:
        return words
    kept = [w for w in words if rng.uniform(0, 1) > p]
    if not kept:
        return [words[rng.randint(0, len(words) - 1)]]
    return kept


# ---------------------------------------------------------------- one sentence


def eda(sentence: str, synonyms: Synonyms, rng: random.Random, *, alpha_sr: float = 0.1,
        alpha_ri: float = 0.1, alpha_rs: float = 0.1, p_rd: float = 0.1, num_aug: float = 9,
        clean: bool = True) -> list[str]:
    """eda.py's ``eda()``: the kept variants, then the (cleaned) original. ``synonyms`` takes the words as
    they appear in the sentence (lower case when ``clean``; wrap a lower-case source in ``cased``
    otherwise)."""
    def prepare(text: str) -> str:
        return get_only_chars(text) if clean else text

    sentence = prepare(sentence)
    words = [w for w in (sentence.split(" ") if clean else sentence.split()) if w]
    if not words:
        return [sentence]
    per_operation = int(num_aug / 4) + 1
    variants: list[list[str]] = []
    if alpha_sr > 0:
        n = max(1, int(alpha_sr * len(words)))
        variants += [synonym_replacement(words, n, synonyms, rng) for _ in range(per_operation)]
    if alpha_ri > 0:
        n = max(1, int(alpha_ri * len(words)))
        variants += [random_insertion(words, n, synonyms, rng) for _ in range(per_operation)]
    if alpha_rs > 0:
        n = max(1, int(alpha_rs * len(words)))
        variants += [random_swap(words, n, rng) for _ in range(per_operation)]
    if p_rd > 0:
        variants += [random_deletion(words, p_rd, rng) for _ in range(per_operation)]
    texts = [prepare(" ".join(v)) for v in variants]
    rng.shuffle(texts)
    if num_aug >= 1:
        texts = texts[:int(num_aug)]
    elif texts:
        keep = num_aug / len(texts)
        texts = [t for t in texts if rng.uniform(0, 1) < keep]
    return [*texts, sentence]


# ---------------------------------------------------------------- the step


@dataclass
class Options:
    alpha_sr: float = 0.1  # synonym replacement: about this share of the words replaced (0: no SR variants)
    alpha_ri: float = 0.1  # random insertion: about this share of the words inserted (0: no RI variants)
    alpha_rs: float = 0.1  # random swap: about this share of the words swapped (0: no RS variants)
    p_rd: float = 0.1  # random deletion: each word dropped with this probability (0: no RD variants)
    num_aug: float = 9  # variants per row (EDA's default; below 1: the expected number, kept at random)
    neighbours: int = 10  # synonyms of a word: at most this many of its nearest words in the embedding table
    min_similarity: float = 0.45  # ... each with a cosine similarity of at least this
    encoder: str = DEFAULT_ENCODER  # the model whose input embeddings give synonyms (shipped name or folder)
    clean: bool = True  # EDA's cleaning (lower case, letters only), the original too; false: text as it is

    def problems(self) -> list[str]:
        out = []
        for name in ("alpha_sr", "alpha_ri", "alpha_rs", "p_rd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                out.append(f"{name}={value!r} must be a number from 0 to 1")
        num_aug = self.num_aug
        if isinstance(num_aug, bool) or not isinstance(num_aug, int | float) or not num_aug >= 0:
            out.append(f"num_aug={num_aug!r} must be a number >= 0 (variants per row)")
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 1:
            out.append(f"neighbours={self.neighbours!r} must be a whole number >= 1")
        if not isinstance(self.min_similarity, int | float) or not -1 <= self.min_similarity <= 1:
            out.append(f"min_similarity={self.min_similarity!r} must be a cosine, from -1 to 1")
        if not isinstance(self.clean, bool):
            out.append(f"clean={self.clean!r} must be true or false")
        return out

    def uses_synonyms(self) -> bool:
        return self.alpha_sr > 0 or self.alpha_ri > 0


def check_pool(pool: Pool, where: str) -> None:
    """A pool whose rows hold text: a chat or edit pool has no one text to edit."""
    if pool.task in ("chat", "edit"):
        raise DeltatuneError(f"{where}: the pool {pool.source} is a {pool.task} set; augment edits one "
                             "text per row (classification or text data)")
    if not pool.rows:
        raise DeltatuneError(f"{where}: the pool {pool.source} is empty; give it a data source with rows")
    bad = next((i for i, r in enumerate(pool.rows) if not isinstance(r.get(pool.text_field), str)), None)
    if bad is not None:
        raise DeltatuneError(f"{where}: row {bad} of {pool.source} has no text in {pool.text_field!r}; name "
                             "the text column (data.text_field) or fix the row")


def variant_row(row: dict[str, Any], text_field: str, text: str, parent: int,
                augmented: bool) -> dict[str, Any]:
    """A copy of ``row`` with ``text``, its parent's index and whether it is a variant."""
    return {**row, text_field: text, "parent": parent, "augmented": augmented}


def run(pool: Pool, options: Options, *, seed: int, progress: Progress = no_progress,
        synonyms: Synonyms | None = None, **context: Any) -> Outcome:
    """EDA on every row of ``pool``: its variants, then the row itself (cleaned when ``options.clean``).

    ``synonyms``: the synonym source (a lower-case word -> its synonyms, e.g. ``Neighbours`` of a toy table);
    by default ``Neighbours`` of ``options.encoder``'s embedding table, loaded only when SR or RI is on."""
    where = "data augment --method eda"
    problems = options.problems()
    if problems:
        raise DeltatuneError(f"{where}: " + "; ".join(problems))
    check_pool(pool, where)
    texts = pool.texts()
    source: Synonyms = no_synonyms
    if options.uses_synonyms():
        source = synonyms if synonyms is not None else Neighbours.from_encoder(
            options.encoder, k=options.neighbours, min_similarity=options.min_similarity)
        if isinstance(source, Neighbours):
            source.prepare(_words_of(texts, options.clean), progress)
    lookup = source if options.clean else cased(source)
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    parents: list[int] = []
    unchanged = empty = 0
    for i, (row, text) in enumerate(zip(pool.rows, texts, strict=True)):
        out = eda(text, lookup, rng, alpha_sr=options.alpha_sr, alpha_ri=options.alpha_ri,
                  alpha_rs=options.alpha_rs, p_rd=options.p_rd, num_aug=options.num_aug, clean=options.clean)
        *variants, original = out
        empty += not original.split()
        unchanged += sum(v == original for v in variants)
        rows += [variant_row(row, pool.text_field, v, i, True) for v in variants]
        rows.append(variant_row(row, pool.text_field, original, i, False))
        parents += [i] * len(out)
        progress("eda", i + 1, len(texts))
    info = {"originals": len(pool.rows), "variants": len(rows) - len(pool.rows),
            "unchanged_variants": unchanged, "rows_without_words": empty}
    return Outcome(rows=rows, indices=parents, scores=None, info=info)


def _words_of(texts: list[str], clean: bool) -> set[str]:
    """The lower-case words whose synonyms EDA may ask for."""
    if clean:
        return {w for t in texts for w in get_only_chars(t).split(" ") if w}
    return {w.lower() for t in texts for w in t.split() if w.isalpha()}
