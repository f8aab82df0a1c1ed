"""Reading a data config's rows, once: cached file reads, labelled texts, conversations, edits, seq2seq pairs and
plain texts, the deterministic train / eval split and the weighted mix of several data sets.

Chat rows are recognised by their fields, row by row (``CHAT_FORMATS``): a list of messages
(``data.messages_field``), ShareGPT's ``conversations`` of ``{from, value}``, Alpaca's ``instruction`` /
``input`` / ``output``, TRL's ``prompt`` / ``completion`` (texts, or lists of messages) and
``prompt`` / ``response``.

A file is read once per (path, modification time, size), so a model request that counts the labels, the
task that encodes them and a method that calibrates on the same data share one read.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune import data
from deltatune.data.config import DataConfig
from deltatune.data.files import label_order
from deltatune.errors import DeltatuneError


def _stamp(path: str) -> tuple[int, int]:
    try:
        st = Path(path).expanduser().stat()
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, stamp: tuple[int, int]) -> data.Records:
    return data.read_records(path)


def records(cfg: DataConfig) -> data.Records:
    """The rows of the local file ``data.path``."""
    assert cfg.path is not None
    return _read_cached(cfg.path, _stamp(cfg.path))


@functools.lru_cache(maxsize=4)
def _labelled_cached(
    name: str | None, path: str | None, stamp: tuple[int, int], text_field: str, label_field: str,
    labels: tuple[str, ...] | None,
) -> data.TextDataset:
    if name is not None:
        ds = data.load(name)
        return ds.keep_labels(list(labels)) if labels is not None else ds
    assert path is not None
    return data.labelled(
        _read_cached(path, stamp), text_field=text_field, label_field=label_field,
        labels=list(labels) if labels is not None else None, name=Path(path).name,
    )


def classification_data(cfg: DataConfig) -> data.TextDataset:
    """The labelled data, filtered to data.labels (cached: a method calibrating on the same data shares the read)."""
    labels = tuple(cfg.labels) if cfg.labels is not None else None
    stamp = _stamp(cfg.path) if cfg.path is not None else (0, 0)
    return _labelled_cached(cfg.name, cfg.path, stamp, cfg.text_field, cfg.label_field, labels)


def classification_parts(cfg: DataConfig) -> list[data.TextDataset]:
    """The labelled data of every part of ``cfg`` with one list of class names: the parts' own when they
    agree, else all their names in ``labelled``'s order (numeric when every name is an integer, else sorted)."""
    parts = []
    for i, part in enumerate(cfg.parts()):
        try:
            parts.append(classification_data(part))
        except DeltatuneError as e:
            raise in_part(e, cfg, i) from e
    if all(p.label_names == parts[0].label_names for p in parts):
        return parts
    found = {n for p in parts for n in p.label_names}
    names = label_order(found)
    index = {n: k for k, n in enumerate(names)}
    return [data.TextDataset(p.name, list(p.texts), [index[p.label_names[y]] for y in p.labels], list(names))
            for p in parts]


def in_part(error: DeltatuneError, cfg: DataConfig, i: int) -> DeltatuneError:
    """An error raised while reading part i of a mix, its keys named ``data[i].<key>``; unchanged otherwise."""
    from deltatune.data.config import part_message

    return DeltatuneError(part_message(str(error), i)) if cfg.mix is not None else error


def mix(parts: list[list[Any]], weights: list[float], seed: int) -> list[Any]:
    """The training examples of several parts by weight: part i gives round(w_i x n_i) examples, every example
    ``int`` times over and a seeded sample without replacement of the rest; the whole is shuffled with
    ``seed``, so packed rows and the first batches hold examples of every part."""
    out: list[Any] = []
    for i, (items, weight) in enumerate(zip(parts, weights, strict=True)):
        target = int(weight * len(items) + 0.5)
        whole, rest = divmod(target, len(items)) if items else (0, 0)
        out += items * whole + random.Random(seed * 1_000_003 + i).sample(items, rest)
    random.Random(seed).shuffle(out)
    return out


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices of a shuffle split, the same for the same seed on any machine."""
    k = int(n * eval_fraction + 0.5)
    if not 0 < k < n:
        raise DeltatuneError(
            f"data.eval_fraction={eval_fraction} of {n} rows leaves an empty train or eval part; "
            "use a fraction nearer 0.5 or more data"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[k:], order[:k]


def cut(items: list, n: int | None) -> list:
    """The first ``n`` items (all of them for None): ``data.max_train`` / ``data.max_eval``."""
    return items if n is None else items[:n]


def edits(table: data.Records) -> list[tuple[str, str]]:
    """(prompt, target) of every row; ``target_new`` (the CounterFact / zsRE name) is read too."""
    out = []
    for i, row in enumerate(table.rows):
        prompt, target = row.get("prompt"), row.get("target", row.get("target_new"))
        if not isinstance(prompt, str) or not isinstance(target, str) or not prompt or not target.strip():
            raise DeltatuneError(
                f"row {i + 1} of {table.source} is not an edit: task 'edit' needs a non-empty text in the fields "
                f"'prompt' and 'target' (or 'target_new'); its fields: {', '.join(map(str, row)) or 'none'}"
            )
        out.append((prompt, target))
    return out


# seq2seq rows: (source, target) field pairs, tried in this order on each row
SEQ2SEQ_FIELDS = (("source", "target"), ("input", "output"), ("prompt", "completion"))


def seq2seq_pairs(table: data.Records) -> list[tuple[str, str]]:
    """(source, target) of every row: the fields ``source`` / ``target``, else ``input`` / ``output`` or ``prompt`` /
    ``completion`` (the first pair whose source the row has); both non-empty texts, else an error naming the row."""
    names = " or ".join(f"{s!r}/{t!r}" for s, t in SEQ2SEQ_FIELDS)
    out = []
    for i, row in enumerate(table.rows):
        where = f"row {i + 1} of {table.source}"
        fields = ", ".join(map(str, row)) or "none"
        pair = next(((s, t) for s, t in SEQ2SEQ_FIELDS if row.get(s) is not None), None)
        if pair is None:
            raise DeltatuneError(f"{where} has no source text: task 'seq2seq' reads rows with the fields {names}; its "
                                 f"fields: {fields}")
        source, target = row.get(pair[0]), row.get(pair[1])
        if target is None:
            raise DeltatuneError(f"{where} has no {pair[1]!r}: task 'seq2seq' needs the target text beside "
                                 f"{pair[0]!r} (fields {names}); its fields: {fields}")
        for field, value in zip(pair, (source, target), strict=True):
            if not isinstance(value, str) or not value.strip():
                raise DeltatuneError(f"{where}: field {field!r} must be a non-empty text for task 'seq2seq', got "
                                     f"{str(value)[:120]!r}")
        out.append((source, target))
    return out


@dataclass
class ChatExample:
    """One chat row: messages rendered with the chat template (the loss on the assistant messages from
    ``learn_from`` on), or TRL's plain-text ``prompt`` / ``completion`` (no template; the loss on the
    completion and EOS)."""

    messages: list[dict] | None = None
    learn_from: int = 0  # TRL's conversational prompt: its assistant turns are context, not targets
    prompt: str | None = None
    completion: str | None = None


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def chat_formats(messages_field: str) -> list[tuple[str, str]]:
    """(name, fields) of every chat format, in the order a row is tried against them."""
    return [
        ("messages", f"{messages_field!r}: a list of {{role, content}} (data.messages_field names the field)"),
        ("ShareGPT", "'conversations': a list of {from, value}, from human / gpt / system"),
        ("Alpaca", "'instruction', optional 'input', 'output' (optional 'system')"),
        ("TRL prompt-completion", "'prompt' and 'completion': texts, or lists of {role, content}"),
        ("prompt-response", "'prompt' and 'response' (optional 'system')"),
    ]


def _format_of(fields: Any, messages_field: str) -> str | None:
    """The first chat format whose fields ``fields`` (a row, or a file's field list) has."""
    def has(f: str) -> bool:
        return f in fields and (not isinstance(fields, dict) or fields[f] is not None)

    if has(messages_field):
        return "messages"
    if has("conversations"):
        return "ShareGPT"
    if has("instruction") and has("output"):
        return "Alpaca"
    if has("prompt") and has("completion"):
        return "TRL prompt-completion"
    if has("prompt") and has("response"):
        return "prompt-response"
    return None


def _no_format(where: str, fields: list[str], messages_field: str) -> DeltatuneError:
    formats = "; ".join(f"{name}: {what}" for name, what in chat_formats(messages_field))
    return DeltatuneError(
        f"{where} matches no chat format (its fields: {', '.join(map(str, fields)) or 'none'}); task 'chat' reads "
        f"rows with the fields of one of: {formats}"
    )


def _json_list(value: Any, where: str, field: str) -> Any:
    """A list field as read from CSV: its JSON text."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DeltatuneError(
            f"{where}: field {field!r} is text but not JSON ({e}); write it as a JSON list like "
            '[{"role": "user", "content": "..."}, ...]'
        ) from e


def _messages(value: Any, where: str, field: str) -> list[dict]:
    good = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    if not good:
        raise DeltatuneError(
            f"{where}: field {field!r} must be a non-empty list of {{\"role\": ..., \"content\": <text>}} messages, "
            f"got {str(value)[:120]}"
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _sharegpt(row: dict, where: str) -> list[dict]:
    turns = _json_list(row["conversations"], where, "conversations")
    if not isinstance(turns, list) or not turns:
        raise DeltatuneError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}} turns")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value", turn.get("content")), str):
            raise DeltatuneError(
                f"{where}: every turn of 'conversations' must be {{\"from\": ..., \"value\": <text>}}, got {str(turn)[:120]}"
            )
        role = str(turn.get("from", turn.get("role")))
        if role not in SHAREGPT_ROLES:
            raise DeltatuneError(
                f"{where}: ShareGPT role {role!r} is not one of {', '.join(SHAREGPT_ROLES)}; rename it in the data"
            )
        messages.append({"role": SHAREGPT_ROLES[role], "content": turn.get("value", turn.get("content"))})
    if isinstance(row.get("system"), str) and row["system"] and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": row["system"]})
    return messages


def _alpaca(row: dict, where: str) -> list[dict]:
    instruction, extra, output = row["instruction"], row.get("input"), row["output"]
    if not isinstance(instruction, str) or not isinstance(output, str) or not output.strip():
        raise DeltatuneError(f"{where}: Alpaca rows need text in 'instruction' and a non-empty text in 'output'")
    # instruction and input on separate lines, as LLaMA-Factory's and axolotl's Alpaca chat prompts join them
    user = instruction + (f"\n{extra}" if isinstance(extra, str) and extra.strip() else "")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if isinstance(row.get("system"), str) and row["system"]:
        messages.insert(0, {"role": "system", "content": row["system"]})
    return messages


def _completion(row: dict, where: str) -> ChatExample:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise DeltatuneError(f"{where}: field 'completion' is empty; every row needs a completion to learn")
        return ChatExample(prompt=prompt, completion=completion)
    if isinstance(prompt, list) and isinstance(completion, list):
        context, answer = _messages(prompt, where, "prompt"), _messages(completion, where, "completion")
        if not any(m["role"] == "assistant" for m in answer):
            raise DeltatuneError(f"{where}: field 'completion' has no assistant message; it is what training learns")
        return ChatExample(messages=context + answer, learn_from=len(context))
    raise DeltatuneError(
        f"{where}: 'prompt' and 'completion' must both be texts or both be lists of {{role, content}} messages "
        f"(TRL's two formats), got a {type(prompt).__name__} and a {type(completion).__name__}"
    )


def _row_example(row: dict, fmt: str, where: str, messages_field: str) -> ChatExample:
    if fmt == "TRL prompt-completion":
        return _completion(row, where)
    if fmt == "messages":
        messages = _messages(_json_list(row[messages_field], where, messages_field), where, messages_field)
    elif fmt == "ShareGPT":
        messages = _sharegpt(row, where)
    elif fmt == "Alpaca":
        messages = _alpaca(row, where)
    else:
        messages = [{"role": "user", "content": str(row["prompt"])},
                    {"role": "assistant", "content": str(row["response"])}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": str(row["system"])})
    if not any(m["role"] == "assistant" for m in messages):
        raise DeltatuneError(
            f"{where} has no assistant message; chat training learns the assistant's turns, so every "
            "conversation needs at least one"
        )
    return ChatExample(messages=messages)


def conversations(table: data.Records, cfg: DataConfig) -> list[ChatExample]:
    """Each row as a chat example, its format found from its fields (``chat_formats``); a list field in a
    CSV cell is read as its JSON text."""
    field = cfg.messages_field
    if _format_of(table.fields, field) is None:
        raise _no_format(table.source, table.fields, field)
    out = []
    for i, row in enumerate(table.rows):
        where = f"row {i + 1} of {table.source}"
        fmt = _format_of(row, field)
        if fmt is None:
            raise _no_format(where, list(row), field)
        out.append(_row_example(row, fmt, where, field))
    return out


def texts(cfg: DataConfig) -> list[str]:
    """The texts of a shipped set, or the ``data.text_field`` column of a file."""
    if cfg.name is not None:
        return data.load(cfg.name).texts
    return [str(t) for t in records(cfg).column(cfg.text_field, "data.text_field", "the text")]



# ---------------------------------------------------------------- preference pairs

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class PreferenceExample:
    """One preference row: a prompt and two completions, the preferred one first. Plain texts, or chat
    messages: ``prompt`` a list of messages and each completion a list of messages (an assistant message, as
    TRL's conversational rows hold it)."""

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def _maybe_messages(value: Any) -> Any:
    """A CSV cell that holds a JSON list of messages, as that list; any other value as it is (a text that only
    starts with "[" stays a text)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed):
            return parsed
    return value


def _completion_messages(value: Any, where: str, field: str) -> list[dict]:
    """A chat completion: a list of messages, one message, or a text (the assistant's message)."""
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        value = [value]
    messages = _messages(value, where, field)
    if not any(m["role"] == "assistant" for m in messages):
        raise DeltatuneError(f"{where}: field {field!r} has no assistant message; it is the completion that is "
                             "compared")
    return messages


def _preference_row(row: dict, where: str) -> PreferenceExample:
    missing = [f for f in PREFERENCE_FIELDS if row.get(f) is None]
    if missing:
        raise DeltatuneError(
            f"{where} has no {' or '.join(repr(f) for f in missing)}: task 'preference' reads rows with the fields "
            f"'prompt', 'chosen' (the preferred completion) and 'rejected'; its fields: "
            f"{', '.join(map(str, row)) or 'none'}"
        )
    prompt, chosen, rejected = (_maybe_messages(row[f]) for f in PREFERENCE_FIELDS)
    if isinstance(prompt, str):
        for field, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str) or not value.strip():
                raise DeltatuneError(
                    f"{where}: field {field!r} must be a non-empty text when 'prompt' is a text (or 'prompt' a list "
                    f"of messages), got {str(value)[:120]!r}"
                )
        return PreferenceExample(prompt, chosen, rejected)
    context = _messages(prompt, where, "prompt")
    return PreferenceExample(context, _completion_messages(chosen, where, "chosen"),
                             _completion_messages(rejected, where, "rejected"))


def preferences(table: data.Records) -> list[PreferenceExample]:
    """Every row as a preference pair ``{prompt, chosen, rejected}``; a list field in a CSV cell is read as its
    JSON text. A row that lacks a field, or holds an empty completion, is an error naming the row."""
    return [_preference_row(row, f"row {i + 1} of {table.source}") for i, row in enumerate(table.rows)]
