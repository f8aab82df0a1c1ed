"""Token encodings shared by the tasks: padding, prompts for label-word classification, chat rendering
with assistant-only labels, plain prompt/completion pairs, model-editing pairs, seq2seq source/target pairs, plain
or packed text, and packing whole examples into rows.

Every encoder returns plain lists of token ids (and labels, -100 where no loss is taken); the tasks in
``deltatune.data.tasks`` batch them.
"""

from __future__ import annotations

import bisect
import logging
import re
from typing import Any

import torch

from deltatune.errors import DeltatuneError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ---------------------------------------------------------------- padding


def pad_id(tokenizer: Any) -> int:
    """The id padding uses: the pad token, else EOS, else 0 (padded positions are masked either way)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0



def right_pad(sequences: list[list[int]], pad_id: int, labels: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded input ids and attention mask; with ``labels``, those too, padded with -100."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        out["labels"] = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
        if labels is not None:
            out["labels"][i, : len(s)] = torch.tensor(labels[i], dtype=torch.long)
    return out


def left_pad(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded input ids, attention mask and position ids (0 at each sequence's first real token).

    Llama-style models take positions from position_ids, not from the mask, so without them a padded
    example would see other positions than it sees alone."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}



# ---------------------------------------------------------------- classification prompts


def _bos(tokenizer: Any) -> list[int]:
    """[BOS] if the tokenizer puts one before a text by itself (Llama-2 style), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and plain[:1] != [bos] else []


class PromptEncoder:
    """Prompt building for generative classification: the text is truncated, never the prompt around it.

    The text's leading space goes with the text (as in the joint string) and the text is put on one line,
    so a newline in it cannot fake a new field of the prompt. The class scores are the logits of each
    label word's first token as it is tokenized right after the prompt (" negative" after "Sentiment:").
    Leading tokens that all label words share are moved into the prompt: SmolLM2 splits " 0" and " 1"
    into "Ġ" + digit, so the prompt ends in "Ġ" and the digits are scored. That shared part is the same
    for every class, so comparing the next-token scores still compares the classes.
    """

    def __init__(self, tokenizer: Any, prompt: str, label_names: list[str], max_length: int) -> None:
        self.prompt = prompt

        def ids(s: str) -> list[int]:
            return list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []

        self.ids = ids
        head, tail = prompt.split("{text}")
        self.space = " " if head.endswith(" ") else ""
        self.head = _bos(tokenizer) + ids(head.removesuffix(" "))
        tail_ids = ids(tail)
        sep = "" if prompt[-1:].isspace() else " "
        self.label_words = [sep + name for name in label_names]
        words = []  # each label word's tokens as they follow the prompt
        for word in self.label_words:
            joint = ids(tail + word)
            words.append(joint[len(tail_ids):] if joint[: len(tail_ids)] == tail_ids else ids(word))
        shared: list[int] = []  # leading tokens all label words share (" 0", " 1": "Ġ") go into the prompt
        while all(len(w) > len(shared) for w in words) and len({w[len(shared)] for w in words}) == 1:
            shared.append(words[0][len(shared)])
        self.tail = tail_ids + shared
        fixed = len(self.head) + len(self.tail)
        self.budget = max_length - fixed
        if self.budget < 1:
            raise DeltatuneError(
                f"data.max_length={max_length} leaves no room for the text: the prompt alone takes {fixed} "
                f"tokens; use data.max_length >= {fixed + 8} or a shorter data.prompt"
            )
        seen: dict[int, str] = {}
        firsts = []
        for word, tokens in zip(self.label_words, words, strict=True):
            if len(tokens) <= len(shared):
                raise DeltatuneError(
                    f"the label word {word!r} is where the other label words only begin, so it has no token of its "
                    "own to score; rename the labels in the data, or train a classification head (data.head: true)"
                )
            first = tokens[len(shared)]
            if first in seen:
                token = tokenizer.convert_ids_to_tokens(first)
                raise DeltatuneError(
                    f"the label words {seen[first]!r} and {word!r} start with the same token {token!r}, so their "
                    "scores cannot tell the classes apart; rename the labels in the data so each starts with a "
                    "word of its own, or train a classification head (data.head: true)"
                )
            seen[first] = word
            firsts.append(first)
        self.label_token_ids = torch.tensor(firsts, dtype=torch.long)

    def encode(self, text: str) -> list[int]:
        text = self.space + " ".join(str(text).split())
        return self.head + self.ids(text)[: self.budget] + self.tail


# ---------------------------------------------------------------- edits


def encode_edit(tokenizer: Any, prompt: str, target: str, max_length: int) -> dict[str, list[int]] | None:
    """Ids and labels of one edit: [BOS] + prompt, then " target" + EOS, each tokenized on its own (joint
    tokenization may merge across the boundary). A prompt too long loses its start; None when the target
    alone does not fit."""
    if not target.startswith(" "):
        target = " " + target
    answer = list(tokenizer(target, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    context = _bos(tokenizer) + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    room = max_length - len(answer)
    if room < 1:
        return None
    context = context[-room:]
    return {"input_ids": context + answer, "labels": answer}


# ---------------------------------------------------------------- chat


def check_template(tokenizer: Any, override: str | None = None) -> str:
    """The chat template in use: ``override`` (data.chat_template) if given, else the tokenizer's."""
    if override is not None:
        return override
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise DeltatuneError(
            "task 'chat' renders conversations with the tokenizer's chat template, but this tokenizer has none; "
            "set data.chat_template (a Jinja template or a .jinja file) or use task 'text'"
        )
    return template


def _render_error(e: Exception, row: int, override: str | None) -> DeltatuneError:
    if override is not None:
        return DeltatuneError(
            f"data.chat_template cannot render conversation {row + 1}: {e}; fix the template (it gets `messages`, "
            "each with role and content, and `add_generation_prompt`)"
        )
    return DeltatuneError(f"the chat template cannot render conversation {row + 1}: {e}; fix that row")


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool, row: int, override: str | None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                             chat_template=override)
    except Exception as e:  # jinja raises its own errors (e.g. "roles must alternate", a syntax error)
        raise _render_error(e, row, override) from e


def encode_chat(tokenizer: Any, messages: list[dict], row: int = 0, *, template: str | None = None,
                learn_from: int = 0) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and its labels: the ids on assistant tokens, -100 elsewhere.

    ``template`` overrides the tokenizer's chat template; assistant messages before ``learn_from`` are context
    (TRL's conversational prompt) and take no loss. A template with {% generation %} markers says itself
    which tokens are the assistant's. Otherwise the assistant spans are found by rendering prefixes: the
    conversation up to each assistant turn with the generation prompt (where the turn starts) and including
    the turn (where it ends; trailing whitespace after the end-of-turn token is left out)."""
    chosen = check_template(tokenizer, template)
    if _GENERATION_TAG.search(chosen):
        try:
            out = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=template
            )
            # the context's tokens, as TRL counts a prompt: rendered with the generation prompt
            context = (tokenizer.apply_chat_template(messages[:learn_from], tokenize=True, return_dict=True,
                                                     add_generation_prompt=True, chat_template=template)
                       if learn_from else {"input_ids": []})
        except Exception as e:  # jinja's own errors
            raise _render_error(e, row, template) from e
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"])
        mask[: len(context["input_ids"])] = [0] * min(len(context["input_ids"]), len(mask))
        return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    full = _render(tokenizer, messages, False, row, template)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < learn_from:
            continue
        start = _render(tokenizer, messages[:i], True, row, template) if i else ""
        end = _render(tokenizer, messages[: i + 1], False, row, template)
        if not (full.startswith(start) and full.startswith(end) and end.startswith(start)):
            raise DeltatuneError(
                f"the chat template renders the start of conversation {row + 1} differently from the whole "
                "conversation (it rewrites earlier turns), so the assistant tokens cannot be found by rendering "
                "prefixes; add {% generation %} ... {% endgeneration %} around the assistant content in "
                "the template (data.chat_template or tokenizer.chat_template)"
            )
        spans.append((len(start), max(len(start), len(end.rstrip()))))
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        mask = [any(s < b and e > a for a, b in spans) for s, e in offsets]
    except (NotImplementedError, ValueError, TypeError):  # no offsets (slow tokenizer): count prefix tokens
        ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
        mask = [False] * len(ids)
        for a, b in spans:
            lo = len(tokenizer(full[:a], add_special_tokens=False)["input_ids"])
            hi = len(tokenizer(full[:b], add_special_tokens=False)["input_ids"])
            mask[lo:hi] = [True] * (hi - lo)
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]


def encode_completion(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """TRL's plain-text prompt/completion: [BOS] + prompt, then completion + EOS, the loss on the completion
    and EOS. The two are tokenized on their own (as the prompt is at inference), so no token straddles the
    boundary and the learned tokens are exactly the completion's."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DeltatuneError(
            "prompt/completion rows end each completion with the EOS token, but the tokenizer has none; "
            "set tokenizer.eos_token"
        )
    context = _bos(tokenizer) + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    answer = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [int(eos)]
    return context + answer, [IGNORE_INDEX] * len(context) + answer


# ---------------------------------------------------------------- seq2seq


def encode_seq2seq(tokenizer: Any, source: str, target: str, max_length: int, max_target_length: int
                   ) -> dict[str, list[int]]:
    """Encoder ids and decoder labels of one (source, target) pair, each tokenized on its own with the tokenizer's
    special tokens (T5: text </s>; BART: <s> text </s>), as transformers' seq2seq examples do (``text_target``):
    the source cut to ``max_length`` tokens and the target to ``max_target_length``. A target that does not end in
    the EOS token (a tokenizer that adds none) gets it, so the model learns where to stop."""
    ids = list(tokenizer(source, truncation=True, max_length=max_length)["input_ids"])
    eos = tokenizer.eos_token_id
    labels = list(tokenizer(text_target=target, truncation=True, max_length=max_target_length)["input_ids"])
    if eos is not None and labels[-1:] != [eos]:
        labels = labels[: max_target_length - 1] + [int(eos)]
    return {"input_ids": ids, "labels": labels}


# ---------------------------------------------------------------- packing


def pack_groups(lengths: list[int], max_length: int) -> list[list[int]]:
    """Whole examples into rows of at most ``max_length`` tokens: best-fit decreasing (TRL's "bfd" strategy),
    each example into the fullest row it still fits, longest first. Returns each row's example indices in
    their original order; deterministic (ties by index)."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the first with room >= n is the best fit
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length={max_length}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, r = free.pop(at)
        else:
            room, r = max_length, len(rows)
            rows.append([])
        rows[r].append(i)
        bisect.insort(free, (room - n, r))
    return [sorted(r) for r in rows]


def pack_labelled(features: list[dict], max_length: int) -> list[dict]:
    """Features with ``input_ids`` and ``labels`` (-100: no loss) joined into rows, every label kept in place."""
    out = []
    for group in pack_groups([len(f["input_ids"]) for f in features], max_length):
        out.append({"input_ids": [t for i in group for t in features[i]["input_ids"]],
                    "labels": [t for i in group for t in features[i]["labels"]],
                    "position_ids": restarting_positions([len(features[i]["input_ids"]) for i in group])})
    return out


def restarting_positions(lengths: list[int]) -> list[int]:
    """Position ids that restart at 0 at each document of a packed row: what marks the documents for the
    attention masks (transformers builds a block-diagonal causal mask from them when no attention mask is given)."""
    return [k for n in lengths for k in range(n)]


# ---------------------------------------------------------------- text


def encode_texts(tokenizer: Any, texts: list[str], max_length: int, packing: bool) -> list[dict]:
    """One feature per text (cut to ``max_length``; texts of one token dropped), or with ``packing`` the texts
    joined with EOS between them and cut into full blocks of ``max_length`` tokens (the ragged end dropped)."""
    if not packing:
        features = []
        for text in texts:
            ids = list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
            if len(ids) >= 2:  # one token has nothing to predict
                features.append({"input_ids": ids})
        if len(features) < len(texts):
            log.warning("dropped %d texts shorter than 2 tokens", len(texts) - len(features))
        return features
    return blocks(documents(tokenizer, texts), max_length)


def documents(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Each text's ids with EOS after it, uncut: what text packing joins."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DeltatuneError(
            "data.packing separates documents with the EOS token, but the tokenizer has none; "
            "set tokenizer.eos_token or data.packing: false"
        )
    return [list(tokenizer(text, verbose=False)["input_ids"]) + [eos] for text in texts]


def blocks(docs: list[list[int]], max_length: int) -> list[dict]:
    """The documents as one stream cut into full blocks of ``max_length`` (TRL's "wrapped" packing: a document
    may run on into the next block; the ragged end is dropped)."""
    stream = [t for d in docs for t in d]
    starts = {0}  # stream offsets where a document begins
    for d in docs[:-1]:
        starts.add(max(starts) + len(d))
    n = max_length
    out = []
    for s in range(0, len(stream) - n + 1, n):
        # positions restart at each document's start, and at the block's start for a document cut there
        positions, p = [], 0
        for k in range(s, s + n):
            p = 0 if k in starts or k == s else p + 1
            positions.append(p)
        out.append({"input_ids": stream[s:s + n], "position_ids": positions})
    return out
