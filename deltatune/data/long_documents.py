"""A long-document task made from the shipped BBC articles, for measuring long-context fine-tuning (LeMo token
elimination, ``docs/lemo.md``).

How a document is made (``make``), for each topic on its own, so a document never mixes topics:

1. the topic's articles (stripped, in file order) are shuffled with ``Random(seed)`` and joined, a blank line
   between them, into one token stream (each article tokenized on its own; the separator's tokens between);
2. walking through the articles, a document's *target* is the first ``target_tokens`` tokens of an article, and its
   *context* the ``length - target_tokens`` tokens of the stream just before that article (the earlier same-topic
   articles; the first of them usually cut at its front), where ``length`` is drawn uniformly from
   ``[min_tokens, max_tokens]`` per document;
3. the next document's context starts after the end of the whole target article, so no article (or part of one)
   is in two documents, and a held-out document shares no text with the training ones.

The loss is on the target only: a long-context language-modelling task whose context (2k-8k tokens of articles on
the same topic) is there to be read, which is what token elimination may thin out. ``rows`` gives TRL's
prompt / completion rows (``data.task: chat`` with a jsonl ``write_jsonl`` writes); ``example`` gives token ids and
labels of exactly ``length`` tokens (the measurement script); the shipped set ``bbc-long``
(``deltatune.data.sets``) holds the documents' whole texts with their topic as the label, made with SmolLM2's
tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.errors import DeltatuneError

SEPARATOR = "\n\n"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class LongDocument:
    topic: str
    context: list[int]  # token ids of the context (earlier same-topic articles)
    target: list[int]  # token ids of the target (the start of the next article)

    def __len__(self) -> int:
        return len(self.context) + len(self.target)


def make(tokenizer: Any = None, *, min_tokens: int = 2048, max_tokens: int = 8192, target_tokens: int = 256,
         topics: list[str] | None = None, seed: int = 0, articles: Any = None) -> list[LongDocument]:
    """The long documents of the shipped BBC articles (``articles``: a ``TextDataset`` to use instead), topic after
    topic; ``tokenizer`` defaults to SmolLM2's."""
    if not 0 < target_tokens < min_tokens <= max_tokens:
        raise DeltatuneError(f"long documents need 0 < target_tokens < min_tokens <= max_tokens, got "
                             f"{target_tokens}, {min_tokens}, {max_tokens}")
    if tokenizer is None:
        from deltatune.data.models import load_tokenizer

        tokenizer = load_tokenizer("smollm2-135m")
    if articles is None:
        from deltatune.data.sets import load

        articles = load("bbc")
    names = topics or list(articles.label_names)
    unknown = [t for t in names if t not in articles.label_names]
    if unknown:
        raise DeltatuneError(f"no topic {unknown[0]!r} in the BBC articles; topics: {', '.join(articles.label_names)}")
    sep = list(tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"])
    rng = random.Random(seed)
    out: list[LongDocument] = []
    for topic in names:
        label = articles.label_names.index(topic)
        texts = [t.strip() for t, y in zip(articles.texts, articles.labels, strict=True) if y == label and t.strip()]
        random.Random(f"{seed}/{topic}").shuffle(texts)
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        stream: list[int] = []
        starts: list[int] = []
        for ids in encoded:
            if stream:
                stream += sep
            starts.append(len(stream))
            stream += list(ids)
        begin = 0  # where the next document's context may start
        length = rng.randint(min_tokens, max_tokens)
        for j, start in enumerate(starts):
            need = length - min(target_tokens, len(encoded[j]))
            if start - need < begin:
                continue
            target = list(encoded[j][:target_tokens])
            out.append(LongDocument(topic, stream[start - need:start], target))
            begin = start + len(encoded[j])
            length = rng.randint(min_tokens, max_tokens)
    return out


def rows(docs: list[LongDocument], tokenizer: Any) -> list[dict[str, str]]:
    """TRL's prompt / completion rows (``data.task: chat``: the loss on the completion). Texts are decoded from the
    ids, so re-tokenizing them may differ by a few tokens where the context was cut."""
    return [{"prompt": tokenizer.decode(d.context), "completion": tokenizer.decode(d.target), "topic": d.topic}
            for d in docs]


def write_jsonl(path: str | Path, docs: list[LongDocument], tokenizer: Any) -> Path:
    """``rows`` as a jsonl file for ``data: {path: PATH, task: chat, max_length: ...}``: a new file, written whole
    (a temporary renamed into place), never over an existing one."""
    path = Path(path)
    if path.exists():
        raise DeltatuneError(f"{path} exists and write_jsonl never replaces a file: give a new path or remove it")
    text = "".join(json.dumps(r) + "\n" for r in rows(docs, tokenizer))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):  # nothing to remove where the folder itself could not be made
            tmp.unlink()
        raise DeltatuneError(f"cannot write {path}: {e.strerror or e}; choose a writable folder") from e
    return path


def example(doc: LongDocument, length: int) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of exactly ``length`` tokens: the context's last tokens, then the target, the
    loss on the target (labels -100 on the context)."""
    keep = length - len(doc.target)
    if keep < 1 or len(doc.context) < keep:
        raise DeltatuneError(f"a document of {len(doc)} tokens cannot give {length}; make documents with "
                             f"min_tokens >= {length}")
    ids = doc.context[len(doc.context) - keep:] + doc.target
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * keep + doc.target}


def dataset(articles: Any = None) -> Any:
    """The shipped set ``bbc-long``: each document's whole text (context, a blank line, target) with its topic."""
    from deltatune.data.models import load_tokenizer
    from deltatune.data.sets import TextDataset, load

    articles = articles if articles is not None else load("bbc")
    tokenizer = load_tokenizer("smollm2-135m")
    docs = make(tokenizer, articles=articles)
    names = list(articles.label_names)
    texts = [tokenizer.decode(d.context) + SEPARATOR + tokenizer.decode(d.target) for d in docs]
    return TextDataset("bbc-long", texts, [names.index(d.topic) for d in docs], names)
