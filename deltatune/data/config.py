"""The ``data`` section of a run config: which data (a shipped set or a local file) and which task format.

Bad values raise on construction, each naming its key (``data.<key>``) and what is allowed; ``problems()``
says what is still missing (a source), so ``DataConfig()`` itself works as a starting point.
"""

from __future__ import annotations

from dataclasses import dataclass

from deltatune import data
from deltatune.errors import DeltatuneError

TASKS = ("text", "chat", "classification", "edit")
DEFAULT_PROMPT = "Text: {text}\nLabel:"
SHIPPED_PROMPTS = {"tweets": "Tweet: {text}\nSentiment:"}


@dataclass
class DataConfig:
    """The ``data`` section of a run config (keys are named ``data.<key>`` in errors)."""

    name: str | None = None  # shipped data set: "tweets", "bbc"
    path: str | None = None  # local file: .jsonl, .json, .csv, .tsv, .parquet, or a datasets save_to_disk folder
    task: str = "classification"  # "text" | "chat" | "classification" | "edit"
    max_length: int = 128
    eval_fraction: float = 0.1
    seed: int = 0  # the split and subsample seed
    text_field: str = "text"
    label_field: str = "label"
    messages_field: str = "messages"  # chat: a list of {"role", "content"}; rows may have "prompt"/"response" instead
    labels: list[str] | None = None  # classification: keep only these labels, in this order
    prompt: str | None = None  # generative classification template with {text}
    max_train: int | None = None  # subsample sizes: stratified (classification) / the first n of the shuffled split
    max_eval: int | None = None
    packing: bool = False  # text: concatenate documents and cut into max_length blocks
    head: bool | None = None  # classification: None = a head for encoders, label words for causal LMs

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DeltatuneError(f"unknown task {self.task!r}; set data.task to one of {', '.join(TASKS)}")
        if self.name is not None and self.path is not None:
            raise DeltatuneError(self._source_problem())
        if self.name is not None and self.name not in data.SHIPPED:
            raise DeltatuneError(
                f"unknown data set {self.name!r}; shipped data sets are: {', '.join(data.names())} "
                "(set data.path for a local file)"
            )
        if self.name is not None and self.task in ("chat", "edit"):
            rows = "messages (or prompt/response)" if self.task == "chat" else "prompt/target"
            raise DeltatuneError(
                f"the shipped data set {self.name!r} holds labelled texts, not {self.task} data; for task "
                f"{self.task!r} set data.path to a file with {rows} rows"
            )
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise DeltatuneError(f"data.max_length={self.max_length!r} must be an integer of at least 2")
        if not 0.0 < self.eval_fraction < 1.0:
            raise DeltatuneError(f"data.eval_fraction={self.eval_fraction} must be between 0 and 1 (exclusive)")
        for key in ("max_train", "max_eval"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DeltatuneError(f"data.{key}={value!r} must be a positive integer or null (all)")
        classification_only = {"labels": self.labels is not None, "prompt": self.prompt is not None,
                               "head": self.head is not None}
        for key, given in classification_only.items():
            if given and self.task != "classification":
                raise DeltatuneError(f"data.{key} applies to task 'classification' only; remove it for task {self.task!r}")
        if self.packing and self.task != "text":
            raise DeltatuneError(f"data.packing applies to task 'text' only; remove it for task {self.task!r}")
        if self.labels is not None:
            self.labels = [data.label_name(x) for x in self.labels]
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
                raise DeltatuneError(f"data.labels={self.labels} must list at least two distinct labels")
        if self.prompt is not None and self.prompt.count("{text}") != 1:
            raise DeltatuneError(
                f"data.prompt={self.prompt!r} must contain {{text}} exactly once, where the text goes, "
                f"e.g. {DEFAULT_PROMPT!r}"
            )

    @staticmethod
    def _source_problem() -> str:
        return (
            f"set exactly one of data.name (a shipped data set: {', '.join(data.names())}) and data.path "
            f"(a {', '.join(data.FILE_TYPES)} file or a datasets save_to_disk folder)"
        )

    def problems(self) -> list[str]:
        """What is still missing (bad values already raise on construction, so DataConfig() itself works)."""
        return [self._source_problem()] if self.name is None and self.path is None else []

    def check(self) -> None:
        """Raise the first of problems(), if any."""
        for problem in self.problems():
            raise DeltatuneError(problem)

    def resolved_prompt(self) -> str:
        return self.prompt or SHIPPED_PROMPTS.get(self.name or "", DEFAULT_PROMPT)
