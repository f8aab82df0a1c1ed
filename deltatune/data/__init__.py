"""The data layer: shipped data sets, local files, models and tokenizers, and the task encodings.

``dt.data.load("tweets")`` and ``dt.data.read_records(path)`` are the public entry points here, with the data
steps ``dt.data.select`` / ``prune`` / ``curate`` / ``augment`` (``deltatune.data.steps``, ``docs/data.md``);
``deltatune.data.models`` loads base models, ``deltatune.data.tasks`` turns rows into batches and losses.
"""

from deltatune.data.files import FILE_TYPES, Records, label_name, labelled, read_records
from deltatune.data.sets import SHIPPED, TWEET_LABELS, ShippedData, TextDataset, load, names, package_folder
from deltatune.data.steps import augment, curate, prune, select

__all__ = [
    "FILE_TYPES",
    "SHIPPED",
    "TWEET_LABELS",
    "Records",
    "ShippedData",
    "TextDataset",
    "augment",
    "curate",
    "label_name",
    "labelled",
    "load",
    "names",
    "package_folder",
    "prune",
    "read_records",
    "select",
]
