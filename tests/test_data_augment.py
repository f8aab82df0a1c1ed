"""``deltatune data augment`` (spec: shared/methods/augmentation.md, tests 1-4): EDA's four operations (the
official eda.py's counts), synonyms from embedding neighbours (threshold, top-k; stop words, inflections and
antonyms left out), the step's rows and determinism, and back-translation's refusal without translation
models."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from deltatune.data import steps
from deltatune.data.steps import backtranslate, eda
from deltatune.data.steps._base import Pool
from deltatune.errors import DeltatuneError

pytestmark = pytest.mark.usefixtures("one_thread")

# a toy synonym source: each word's synonyms, most similar first
TOY = {"movie": ["film", "picture"], "great": ["superb", "fine"], "actor": ["performer"], "plot": ["story"],
       "music": ["score"], "long": ["lengthy"], "ending": ["finale"], "scene": ["shot"]}
# 20 words; "movie" and "great" occur twice, and six are stop words
SENTENCE = ("the movie was great and the actor in the movie was great but plot music long ending scene felt "
            "odd")
WORDS = SENTENCE.split()


def toy(word: str) -> list[str]:
    return list(TOY.get(word, []))


def rows(n: int = 6) -> list[dict]:
    texts = ["The movie was GREAT, and the actor shone!", "a long plot with music 42 times", "ending scene",
             "the great movie", "Plot twist: the actor is the movie's music", "long long ending"]
    return [{"text": texts[i % len(texts)], "label": ["pos", "neg"][i % 2], "id": i} for i in range(n)]


# ---------------------------------------------------------------- spec test 1: the operations' counts


def test_sr_replaces_n_word_types_at_every_occurrence() -> None:
    assert len(WORDS) == 20
    n = max(1, int(0.1 * len(WORDS)))
    for seed in range(20):
        out = eda.synonym_replacement(WORDS, n, toy, random.Random(seed))
        assert len(out) == len(WORDS)
        replaced = {a for a, b in zip(WORDS, out, strict=True) if a != b}
        assert len(replaced) == n == 2, "n = max(1, ⌊0.1·20⌋) word types replaced"
        for word in replaced:
            assert word not in out, f"every occurrence of {word!r} is replaced"
            picks = {b for a, b in zip(WORDS, out, strict=True) if a == word}
            assert len(picks) == 1 and picks <= set(TOY[word]), "one synonym per replaced word, everywhere"


def test_ri_inserts_exactly_n_first_synonyms() -> None:
    for seed in range(20):
        out = eda.random_insertion(WORDS, 2, toy, random.Random(seed))
        assert len(out) == len(WORDS) + 2
        added = Counter(out) - Counter(WORDS)
        assert sum(added.values()) == 2
        assert set(added) <= {s[0] for s in TOY.values()}, "RI inserts a word's first synonym"
        it = iter(out)
        assert all(w in it for w in WORDS), "the original words keep their order"


def test_ri_without_synonyms_inserts_nothing() -> None:
    words = ["zzz", "qqq", "xxx"]
    assert eda.random_insertion(words, 3, toy, random.Random(0)) == words


def test_rs_keeps_the_multiset_and_moves_words() -> None:
    moved = 0
    for seed in range(20):
        out = eda.random_swap(WORDS, 2, random.Random(seed))
        assert Counter(out) == Counter(WORDS)
        moved += out != WORDS
    assert moved >= 15, "swaps of distinct positions change the order (unless equal words are swapped)"


def test_rd_extremes() -> None:
    assert eda.random_deletion(WORDS, 0.0, random.Random(0)) == WORDS
    for seed in range(5):
        one = eda.random_deletion(WORDS, 1.0, random.Random(seed))
        assert len(one) == 1 and one[0] in WORDS
    assert eda.random_deletion(["alone"], 1.0, random.Random(0)) == ["alone"], "a one-word sentence stays"
    kept = [len(eda.random_deletion(WORDS, 0.5, random.Random(s))) for s in range(200)]
    assert abs(sum(kept) / len(kept) - 10) < 1.0, "each word goes with probability p"


# ---------------------------------------------------------------- spec test 2: eda()


def test_eda_returns_num_aug_variants_then_the_cleaned_original() -> None:
    text = "Hello, World! It's 42 degrees -- the movie's GREAT"
    out = eda.eda(text, toy, random.Random(0), num_aug=9)
    assert len(out) == 10
    assert out[-1] == eda.get_only_chars(text) == "hello world its degrees the movies great"
    assert all(o == eda.get_only_chars(o) for o in out), "every variant is cleaned as well"


def _synonym_sentences(out: list[str], original: str) -> list[str]:
    """Variants with the original's length and a word it lacks: only SR makes them (RI adds words; RS / RD add
    none)."""
    words = set(original.split())
    return [o for o in out[:-1] if len(o.split()) == len(original.split()) and set(o.split()) - words]


def test_alpha_sr_zero_gives_no_synonym_sentence() -> None:
    original = eda.get_only_chars(SENTENCE)
    with_sr = eda.eda(SENTENCE, toy, random.Random(0), num_aug=12)
    without = eda.eda(SENTENCE, toy, random.Random(0), alpha_sr=0.0, num_aug=12)
    assert len(without) == 13 and len(with_sr) == 13
    assert _synonym_sentences(with_sr, original), "the check finds SR sentences when SR runs"
    assert not _synonym_sentences(without, original)


def test_operations_with_alpha_zero_are_skipped_and_small_num_aug_samples() -> None:
    only_rs = eda.eda(SENTENCE, toy, random.Random(0), alpha_sr=0, alpha_ri=0, p_rd=0, num_aug=20)
    assert len(only_rs) == 6 + 1, "⌊20/4⌋+1 = 6 swaps, all kept, then the original"
    assert all(Counter(o.split()) == Counter(WORDS) for o in only_rs)
    kept = [len(eda.eda(SENTENCE, toy, random.Random(s), num_aug=0.5)) - 1 for s in range(200)]
    assert 0.4 < sum(kept) / 200 < 0.6, "num_aug < 1 is the expected number of variants kept"


# ---------------------------------------------------------------- spec test 4: synonyms from embedding
# neighbours


def toy_neighbours(**kwargs) -> eda.Neighbours:
    """A planted table around "happy": two true synonyms above the threshold, one below, an antonym, an
    inflection and a stop word that are nearer still, and an unrelated word."""
    happy = torch.tensor([1.0, 0.0, 0.0, 0.0])

    def at(cos: float, axis: int) -> torch.Tensor:
        v = torch.zeros(4)
        v[0], v[axis] = cos, (1 - cos**2) ** 0.5
        return v

    table = {"happy": happy, "glad": at(0.9, 1), "joyful": at(0.8, 2), "cheerful": at(0.5, 3),
             "sad": at(0.95, 1), "happily": at(0.97, 2), "the": at(0.99, 3),
             "stone": torch.tensor([0.0, 0.0, 0.0, 1.0])}
    vectors = torch.stack(list(table.values())) * 3.0  # not unit length: the cosine normalises
    return eda.Neighbours(list(table), vectors, **{"min_similarity": 0.6, **kwargs})


def test_neighbours_above_threshold_without_antonyms_inflections_or_stop_words() -> None:
    source = toy_neighbours()
    assert source("happy") == ["glad", "joyful"], "ranked by cosine, above 0.6 only"
    assert toy_neighbours(k=1)("happy") == ["glad"], "top-k"
    assert "sad" in toy_neighbours(antonyms=())("happy"), "the planted antonym is near: the filter removes it"
    anything = toy_neighbours(min_similarity=0.0)("happy")
    assert source("the") == [] and "the" not in anything, "stop words: never"
    assert source("unknown") == []
    assert "happily" not in anything, "the word's own inflections are left out"
    assert eda._negation("happy", "unhappy") and not eda._negation("happy", "sad")


def test_sr_with_embedding_neighbours_replaces_only_with_neighbours_and_never_stop_words() -> None:
    source = toy_neighbours()
    vectors = torch.nn.functional.normalize(source.vectors, dim=-1)
    sentence = "the happy stone and the happy day".split()  # no synonym is another candidate: no chains
    for seed in range(30):
        out = eda.synonym_replacement(sentence, 3, source, random.Random(seed))
        for before, after in zip(sentence, out, strict=True):
            if before in eda.STOP_WORDS:
                assert after == before, "a stop word is never replaced"
            elif after != before:
                assert after in source(before)
                cos = float(vectors[source.index[before]] @ vectors[source.index[after]])
                assert cos >= 0.6 - 1e-6 and after != "sad"


def test_whole_words_of_a_wordpiece_and_a_bpe_vocabulary() -> None:
    wordpiece = {"[CLS]": 0, "the": 1, "##ing": 2, "good": 3, "ok": 4, "movie": 5, "12th": 6, "[unused1]": 7}
    assert eda._whole_words(wordpiece) == {"the": 1, "good": 3, "movie": 5}
    bpe = {"Ġgood": 1, "good": 2, "Ġmovie": 3, "ing": 4, "ĠGood": 5, "Ġok": 6}
    assert eda._whole_words(bpe) == {"good": 1, "movie": 3}


@pytest.mark.slow
def test_minilm_neighbours_look_like_synonyms() -> None:
    source = eda.Neighbours.from_encoder("minilm-l6")
    assert {"excellent", "great"} & set(source("good")) and "bad" not in source("good")
    assert "film" in source("movie") and "movies" not in source("movie")
    assert "unhappy" not in source("happy") and "sad" not in source("happy")
    assert source("the") == []


# ---------------------------------------------------------------- the step: rows, spec test 3 (determinism)


def run_eda(pool_rows: list[dict], seed: int = 0, **options) -> steps.Outcome:
    pool = Pool(pool_rows, "text", "label")
    return eda.run(pool, eda.Options(**options), seed=seed, synonyms=toy)


def test_the_step_writes_variants_then_the_original_with_parent_and_label() -> None:
    given = rows()
    outcome = run_eda(given, num_aug=4)
    assert len(outcome.rows) == len(given) * 5 == len(outcome.indices)
    for k, row in enumerate(outcome.rows):
        parent = given[row["parent"]]
        assert outcome.indices[k] == row["parent"]
        assert (row["label"], row["id"]) == (parent["label"], parent["id"]), "variants keep the row's fields"
        assert row["augmented"] == (k % 5 != 4), "four variants, then the original"
    originals = [r for r in outcome.rows if not r["augmented"]]
    assert [r["text"] for r in originals] == [eda.get_only_chars(r["text"]) for r in given]
    assert outcome.info["originals"] == 6 and outcome.info["variants"] == 24
    assert given == rows(), "the pool's rows are not changed"


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    a, b = run_eda(rows(), seed=3), run_eda(rows(), seed=3)
    assert a.rows == b.rows
    assert run_eda(rows(), seed=4).rows != a.rows


def test_global_random_state_is_neither_used_nor_changed() -> None:
    random.seed(123)
    state = random.getstate()
    first = run_eda(rows(), seed=0).rows
    assert random.getstate() == state
    random.seed(999)
    assert run_eda(rows(), seed=0).rows == first


def test_clean_false_keeps_the_text_as_it_is() -> None:
    given = rows()
    outcome = run_eda(given, clean=False, num_aug=8, p_rd=0.0)
    originals = [r["text"] for r in outcome.rows if not r["augmented"]]
    assert originals == [r["text"] for r in given]
    first = [r["text"] for r in outcome.rows if r["parent"] == 1 and r["augmented"]]
    assert all("42" in t for t in first), "without cleaning, digits survive in every variant (no deletion)"
    movie = [r["text"] for r in outcome.rows if r["parent"] == 3 and r["augmented"]]
    assert any("film" in t or "picture" in t for t in movie), "alphabetic tokens still get synonyms"
    assert eda.cased(toy)("Movie") == ["Film", "Picture"] and eda.cased(toy)("movie's") == []


def test_a_row_without_words_is_kept_without_variants() -> None:
    outcome = run_eda([{"text": "42 !!", "label": "pos"}, {"text": "great movie", "label": "neg"}], num_aug=2)
    assert [r["parent"] for r in outcome.rows] == [0, 1, 1, 1]
    assert outcome.info["rows_without_words"] == 1


@pytest.mark.parametrize(("options", "needle"), [
    ({"alpha_sr": 1.5}, "alpha_sr=1.5 must be a number from 0 to 1"),
    ({"num_aug": -1}, "num_aug=-1 must be a number >= 0"),
    ({"neighbours": 0}, "neighbours=0 must be a whole number >= 1"),
    ({"clean": "yes"}, "clean='yes' must be true or false"),
])
def test_bad_options_are_refused(options, needle) -> None:
    with pytest.raises(DeltatuneError, match=needle):
        run_eda(rows(), **options)


def test_pools_it_cannot_edit_are_refused() -> None:
    with pytest.raises(DeltatuneError, match="is a chat set"):
        eda.run(Pool([{"messages": []}], task="chat"), eda.Options(), seed=0, synonyms=toy)
    with pytest.raises(DeltatuneError, match="empty"):
        eda.run(Pool([]), eda.Options(), seed=0, synonyms=toy)
    with pytest.raises(DeltatuneError, match="row 1 .* has no text in 'text'"):
        eda.run(Pool([{"text": "a b"}, {"body": "c"}]), eda.Options(), seed=0, synonyms=toy)


def test_augment_through_the_data_step_writes_rows_and_manifest(tmp_path: Path) -> None:
    """``dt.data.augment`` runs this module (no synonym operation: no encoder is loaded) and writes its
    output."""
    result = steps.augment(rows(), alpha_sr=0.0, alpha_ri=0.0, num_aug=4, seed=1, out=tmp_path / "aug")
    assert len(result.rows) == 6 * 5, "RS and RD make ⌊4/4⌋+1 = 2 each, all 4 kept, then the original"
    written = [json.loads(line) for line in (tmp_path / "aug" / "data.jsonl").read_text().splitlines()]
    assert written == result.rows
    manifest = json.loads((tmp_path / "aug" / "manifest.json").read_text())
    assert manifest["method"] == "eda" and manifest["seed"] == 1
    assert steps.augment(rows(), alpha_sr=0.0, alpha_ri=0.0, num_aug=4, seed=1).rows == result.rows


def test_inline_augment_in_a_run_config_trains_on_the_variants(tmp_path: Path, monkeypatch) -> None:
    """``data: {augment: {method: eda, ...}}`` in a training config: the training part grows by the variants
    (the held-out part does not), and the run trains."""
    from test_head_artifacts import run_config, save_tiny_encoder

    import deltatune as dt
    from deltatune.train import loop
    from deltatune.train.config import load_config

    monkeypatch.setenv("DELTATUNE_DATA_CACHE", str(tmp_path / "cache"))
    model = save_tiny_encoder(tmp_path / "encoder", tmp_path / "data.jsonl")
    lora = {"name": "lora", "r": 2, "alpha": 4, "targets": ["query", "value"]}
    cfg = run_config(model, tmp_path / "data.jsonl", lora, tmp_path / "run", steps=2)
    plain = loop.build(load_config(cfg)).task
    cfg["data"]["augment"] = {"method": "eda", "alpha_sr": 0.0, "alpha_ri": 0.0, "num_aug": 2, "clean": False}
    augmented = loop.build(load_config(cfg)).task
    assert len(augmented.train) == 3 * len(plain.train), "two variants and the original per training row"
    assert len(augmented.eval) == len(plain.eval)
    assert dt.train(cfg)["steps"] == 2


# ---------------------------------------------------------------- back-translation


def test_backtranslation_without_models_says_why() -> None:
    pool = Pool(rows(), "text", "label")
    with pytest.raises(DeltatuneError, match="ships no translation model") as e:
        backtranslate.run(pool, backtranslate.Options(), seed=0)
    assert "translator and back_translator are not set" in str(e.value) and "--method eda" in str(e.value)
    with pytest.raises(DeltatuneError, match="back_translator is not set"):
        steps.augment(rows(), method="backtranslation", translator="somewhere/opus-mt-en-de")


def test_backtranslation_keeps_changed_texts_and_drops_identical_ones() -> None:
    given = rows(4)

    def to_pivot(texts: list[str]) -> list[str]:
        return [f"<{t}>" for t in texts]

    def back(texts: list[str]) -> list[str]:  # row 0 comes back unchanged (but for case), row 2 empty
        out = [t[1:-1] for t in texts]
        same, empty = given[0]["text"], given[2]["text"]
        return [o.upper() if o == same else "" if o == empty else o + " indeed" for o in out]

    outcome = backtranslate.run(Pool(given, "text", "label"), backtranslate.Options(), seed=0,
                                translate=(to_pivot, back))
    assert [(r["parent"], r["augmented"]) for r in outcome.rows] == [
        (0, False), (1, True), (1, False), (2, False), (3, True), (3, False)]
    assert outcome.rows[1]["text"] == given[1]["text"] + " indeed"
    assert outcome.rows[1]["label"] == given[1]["label"]
    assert outcome.indices == [r["parent"] for r in outcome.rows]
    assert outcome.info["dropped_identical_or_empty"] == 2


def test_backtranslation_refuses_a_model_that_is_not_seq2seq(tmp_path: Path) -> None:
    from conftest import save_word_llama

    folder = str(save_word_llama(tmp_path / "llama"))
    options = backtranslate.Options(translator=folder, back_translator=folder)
    with pytest.raises(DeltatuneError, match="not an encoder-decoder"):
        backtranslate.run(Pool(rows(), "text", "label"), options, seed=0)
