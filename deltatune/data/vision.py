"""``task: image-classification`` (and what ``task: audio-classification``, ``deltatune.data.audio``, shares with it).

Sources (``data.name`` or ``data.path``):

- a folder with one sub-folder per class (the sub-folder's name is the class), each holding image files (PNG, JPEG,
  BMP, GIF: read with Pillow, which must then be installed) or ``.npy`` arrays;
- an ``.npz`` file of arrays: the inputs under ``image`` / ``images`` / ``pixel_values`` / ``pixels`` / ``x`` (one
  stacked array, or an object array of arrays of any sizes), the classes under ``data.label_field`` (``label``) /
  ``labels`` / ``y`` (integers or names), and optionally ``label_names`` (the name of each integer class);
- a ``.parquet`` file with the same column names, each input a nested list (H×W or H×W×C), raw file bytes, or a
  ``datasets`` Image struct ``{"bytes": ...}``;
- the shipped set ``digits``: scikit-learn's bundled 8×8 handwritten digits (1,797 images, values 0-16), read from
  the package's own data file (``sklearn/datasets/data/digits.csv.gz``, what ``load_digits`` reads) without
  importing scikit-learn.

Each image becomes the model's ``pixel_values`` in plain torch, since no image processor can be downloaded here:
values scaled to [0, 1] (``uint8`` / 255, ``uint16`` / 65535; floats are taken as already in [0, 1]; digits / 16),
grey images repeated to ``config.num_channels`` channels (colour ones averaged to one channel for a 1-channel
model; an alpha channel dropped), resized to ``config.image_size`` with bilinear interpolation (antialiased when
shrinking), then normalised with the mean and std of a ``preprocessor_config.json`` in the model folder when it
has one, else 0.5 / 0.5 (``ViTImageProcessor``'s defaults). Images of different sizes are fine: each is resized.

Splits and subsamples are the text classification's own (``TextDataset.split`` / ``subset``: stratified, seeded),
``data.labels`` keeps (and orders) classes, ``data.max_train`` / ``data.max_eval`` cut the parts. The model is
loaded with its image- (audio-) classification head (``AutoModelForImageClassification`` /
``AutoModelForAudioClassification``) sized to the data's classes; a head the folder lacks (or of another size) is
fresh and trains fully next to any method's delta (``deltatune.core.fresh_head``). The loss is the cross-entropy
of the head's logits; evaluation gives ``loss`` and ``accuracy``.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deltatune.core import fresh_head
from deltatune.data import models
from deltatune.data.config import DataConfig
from deltatune.data.files import label_order
from deltatune.data.sets import SHIPPED, TextDataset, package_folder
from deltatune.data.tasks import Task, _device_of
from deltatune.errors import DeltatuneError

KIND = "image-classification"
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
IMAGE_FIELDS = ("image", "images", "pixel_values", "pixels", "img", "x")
LABEL_FIELDS = ("label", "labels", "y", "target")
DIGITS_FILE = Path("datasets") / "data" / "digits.csv.gz"


# ---------------------------------------------------------------- examples


@dataclass
class MediaDataset:
    """Decoded examples (one numpy array each), their integer classes and the class names."""

    name: str
    items: list[Any]
    labels: list[int]
    label_names: list[str]

    def __post_init__(self) -> None:
        # a TextDataset of the indices: its checks, stratified split, subsample and keep_labels, unchanged
        self._index = TextDataset(self.name, [str(i) for i in range(len(self.items))], list(self.labels),
                                  list(self.label_names))

    def __len__(self) -> int:
        return len(self.items)

    def _take(self, ds: TextDataset) -> MediaDataset:
        return MediaDataset(self.name, [self.items[int(t)] for t in ds.texts], list(ds.labels), list(ds.label_names))

    def keep_labels(self, names: list[str]) -> MediaDataset:
        return self._take(self._index.keep_labels(names))

    def split(self, eval_fraction: float, seed: int = 0) -> tuple[MediaDataset, MediaDataset]:
        train, held = self._index.split(eval_fraction, seed)
        return self._take(train), self._take(held)

    def subset(self, n: int, seed: int = 0) -> MediaDataset:
        return self._take(self._index.subset(n, seed))


def labelled(name: str, items: list[Any], raw: list[Any], names: list[str] | None = None) -> MediaDataset:
    """Examples with their classes as found (integers or names); ``names``: the name of each integer class."""
    if len(items) != len(raw):
        raise DeltatuneError(f"{name} has {len(items)} inputs but {len(raw)} labels; give one label per input")
    if not items:
        raise DeltatuneError(f"{name} holds no examples; give at least two classes with examples each")
    values = [v.item() if isinstance(v, np.generic) else v for v in raw]
    values = [v.decode() if isinstance(v, bytes) else v for v in values]
    if names is not None:
        bad = [v for v in values if not (isinstance(v, int) and 0 <= v < len(names))]
        if bad:
            raise DeltatuneError(f"{name} has label {bad[0]!r} but only {len(names)} label_names; labels must index "
                                 "label_names")
        return MediaDataset(name, items, [int(v) for v in values], [str(n) for n in names])
    found = label_order({str(v) for v in values})
    index = {n: i for i, n in enumerate(found)}
    return MediaDataset(name, items, [index[str(v)] for v in values], found)


def _field(fields: list[str], wanted: tuple[str, ...], what: str, source: str) -> str:
    for name in wanted:
        if name in fields:
            return name
    raise DeltatuneError(f"{source} has no {what} field (looked for {', '.join(wanted)}; it has "
                         f"{', '.join(fields) or 'none'}); rename it to one of those")


def read_source(cfg: DataConfig, *, inputs: tuple[str, ...], files: tuple[str, ...], decode: Any,
                shipped: Any) -> MediaDataset:
    """The labelled examples of ``cfg``'s source (a shipped set through ``shipped(name)``, a class folder, an .npz or
    a .parquet file), each input passed through ``decode(value, where)`` (a file path, bytes or an array), then
    ``data.labels`` applied."""
    if cfg.name is not None:
        ds = shipped(cfg.name)
    else:
        assert cfg.path is not None
        path = Path(cfg.path).expanduser()
        if path.is_dir():
            ds = _read_folder(path, files, decode)
        elif not path.exists():
            raise DeltatuneError(f"data.path={cfg.path!r} does not exist; give a folder with one sub-folder per "
                                 "class, an .npz or a .parquet file")
        elif path.suffix == ".npz":
            ds = _read_npz(path, cfg, inputs, decode)
        elif path.suffix == ".parquet":
            ds = _read_parquet(path, cfg, inputs, decode)
        else:
            raise DeltatuneError(f"data.path={cfg.path!r}: task {cfg.task!r} reads a folder with one sub-folder per "
                                 "class, an .npz or a .parquet file")
    return ds.keep_labels(list(cfg.labels)) if cfg.labels is not None else ds


def _read_folder(root: Path, files: tuple[str, ...], decode: Any) -> MediaDataset:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DeltatuneError(f"{root} has {len(classes)} class folder(s); give one sub-folder per class (at least "
                             "two), each holding that class's files")
    items, labels = [], []
    suffixes = (*files, ".npy")
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in suffixes)
        if not found:
            raise DeltatuneError(f"{root / name} holds no {' / '.join(suffixes)} files; put the class's examples "
                                 "there or remove the folder")
        for p in found:
            items.append(decode(p, str(p)))
            labels.append(label)
    return MediaDataset(root.name, items, labels, classes)


def _read_npz(path: Path, cfg: DataConfig, inputs: tuple[str, ...], decode: Any) -> MediaDataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:  # an object array: it would need pickle, which deltatune never reads
        raise DeltatuneError(f"{path} holds an object array, which needs pickle (never read here); store the inputs "
                             "as one stacked array, or use a class folder or a parquet file") from e
    fields = list(arrays)
    x = _field(fields, inputs, "input", str(path))
    y = _field(fields, (cfg.label_field, *LABEL_FIELDS), "label", str(path))
    names = [str(n) for n in arrays["label_names"].tolist()] if "label_names" in arrays else None
    rate = int(arrays["sampling_rate"]) if "sampling_rate" in arrays else None
    items = [decode(a if rate is None else (a, rate), f"{path}[{i}]") for i, a in enumerate(arrays[x])]
    return labelled(path.name, items, list(arrays[y].tolist()), names)


def _read_parquet(path: Path, cfg: DataConfig, inputs: tuple[str, ...], decode: Any) -> MediaDataset:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DeltatuneError("reading .parquet files needs pyarrow; install it with: pip install pyarrow") from e
    table = pq.read_table(path)
    fields = list(table.column_names)
    x = _field(fields, inputs, "input", str(path))
    y = _field(fields, (cfg.label_field, *LABEL_FIELDS), "label", str(path))
    items = [decode(v, f"{path} row {i}") for i, v in enumerate(table.column(x).to_pylist())]
    return labelled(path.name, items, table.column(y).to_pylist())


# ---------------------------------------------------------------- images


def _pil_array(source: Any, where: str) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as e:
        raise DeltatuneError(f"{where}: reading image files needs Pillow; install it (pip install pillow) or give the "
                             "images as .npy / .npz arrays") from e
    try:
        with Image.open(source if not isinstance(source, bytes) else io.BytesIO(source)) as image:
            return np.asarray(image.convert("RGBA") if image.mode in ("P", "PA", "LA") else image)
    except OSError as e:
        raise DeltatuneError(f"{where} is not an image Pillow can read ({e}); give a PNG, JPEG, BMP or GIF") from e


def decode_image(value: Any, where: str) -> np.ndarray:
    """One image as a numpy array (H×W, H×W×C or C×H×W) from a path, file bytes, a datasets Image struct or values."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str | Path):
        path = Path(value)
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        return _pil_array(path, where)
    if isinstance(value, bytes):
        return _pil_array(value, where)
    try:
        array = np.asarray(value)
    except ValueError as e:
        raise DeltatuneError(f"{where}: the image's rows have different lengths; give a rectangular array") from e
    if array.dtype == object or array.ndim not in (2, 3):
        raise DeltatuneError(f"{where}: an image is an H×W, H×W×C or C×H×W array, got shape {array.shape}")
    return array


def image_size(config: Any) -> tuple[int, int]:
    size = config.image_size
    return (int(size[0]), int(size[1])) if isinstance(size, list | tuple) else (int(size), int(size))


@dataclass(frozen=True)
class ImageShape:
    """What the model takes: channels, height, width, and the normalisation."""

    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @staticmethod
    def of(model: torch.nn.Module) -> ImageShape:
        cfg = model.config
        channels = int(getattr(cfg, "num_channels", 3))
        mean, std = (0.5,) * channels, (0.5,) * channels
        folder = Path(str(getattr(cfg, "_name_or_path", "") or ""))
        processor = folder / "preprocessor_config.json"
        if processor.is_file():
            saved = json.loads(processor.read_text())
            if saved.get("do_normalize", True) and "image_mean" in saved and "image_std" in saved:
                mean, std = _per_channel(saved["image_mean"], channels), _per_channel(saved["image_std"], channels)
            elif not saved.get("do_normalize", True):
                mean, std = (0.0,) * channels, (1.0,) * channels
        return ImageShape(channels, image_size(cfg), mean, std)


def _per_channel(value: Any, channels: int) -> tuple[float, ...]:
    values = [float(v) for v in (value if isinstance(value, list | tuple) else [value])]
    return tuple(values * channels)[:channels] if len(values) == 1 else tuple(values[:channels])


def _scaled(array: np.ndarray, where: str) -> torch.Tensor:
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 255.0)
    if array.dtype == np.uint16:
        return torch.from_numpy(array.astype(np.float32) / 65535.0)
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.number):
        return torch.from_numpy(array.astype(np.float32))
    raise DeltatuneError(f"{where}: image values of type {array.dtype} are not numbers")


def pixel_values(array: np.ndarray, shape: ImageShape, where: str = "an image") -> torch.Tensor:
    """One image as the model's ``pixel_values`` (channels, height, width), float32 (see the module doc)."""
    x = _scaled(np.asarray(array), where)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    elif x.dim() == 3 and x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3, 4):
        x = x.permute(2, 0, 1)  # H×W×C -> C×H×W
    elif x.dim() != 3:
        raise DeltatuneError(f"{where}: an image is an H×W, H×W×C or C×H×W array, got shape {tuple(x.shape)}")
    if x.shape[0] == 4:
        x = x[:3]  # drop alpha
    if x.shape[0] == 1 and shape.channels != 1:
        x = x.expand(shape.channels, -1, -1)
    elif x.shape[0] != shape.channels:
        if shape.channels != 1:
            raise DeltatuneError(f"{where} has {x.shape[0]} channels but the model takes {shape.channels}; give "
                                 f"grey or {shape.channels}-channel images")
        x = x.mean(0, keepdim=True)
    if x.shape[0] == 0 or min(x.shape[1:]) == 0:
        raise DeltatuneError(f"{where} is empty (shape {tuple(x.shape)})")
    if tuple(x.shape[1:]) != shape.size:
        shrink = x.shape[1] > shape.size[0] or x.shape[2] > shape.size[1]
        x = F.interpolate(x.unsqueeze(0), size=shape.size, mode="bilinear", align_corners=False,
                          antialias=shrink).squeeze(0)
    mean = torch.tensor(shape.mean).view(-1, 1, 1)
    std = torch.tensor(shape.std).view(-1, 1, 1)
    return ((x - mean) / std).contiguous()


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (1797×8×8 float32 in [0, 1], 1797 labels), from the package's data file
    (what ``sklearn.datasets.load_digits`` reads), without importing scikit-learn."""
    item = SHIPPED["digits"]
    path = package_folder(item.module, item.requirement, "data set 'digits'") / DIGITS_FILE
    if not path.is_file():
        raise DeltatuneError(f"{path} is missing, so scikit-learn is not installed whole; reinstall it with: pip "
                             "install --force-reinstall scikit-learn")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 65:
        raise DeltatuneError(f"{path} is not scikit-learn's digits table (65 columns); reinstall scikit-learn")
    return (table[:, :64] / 16.0).reshape(-1, 8, 8), table[:, 64].astype(np.int64)


def check_shipped_kind(name: str, kind: str) -> None:
    """``name`` is a shipped set of ``kind`` ("image" / "audio"), else one line naming the ones that are."""
    if SHIPPED.get(name) is None or SHIPPED[name].kind != kind:
        found = SHIPPED[name].kind if name in SHIPPED else "unknown"
        raise DeltatuneError(f"data set {name!r} is not an {kind} set ({found}); task '{kind}-classification' reads "
                             f"{', '.join(n for n, s in SHIPPED.items() if s.kind == kind)} or data.path")


def _shipped_image(name: str) -> MediaDataset:
    check_shipped_kind(name, "image")
    images, labels = load_digits_arrays()
    return MediaDataset("digits", list(images), [int(y) for y in labels], [str(d) for d in range(10)])


# ---------------------------------------------------------------- the task


class MediaClassificationTask(Task):
    """Images or spectrograms of fixed shape through the model's classification head: features
    ``{input_key: tensor, "label": int}``, batches ``{input_key: (batch, ...), "labels": (batch,)}``."""

    kind = KIND
    input_key = "pixel_values"
    chunked_loss = False

    def __init__(self, cfg: DataConfig, train: list[dict], eval: list[dict], label_names: list[str]) -> None:
        if not train or not eval:
            part = "train" if not train else "eval"
            raise DeltatuneError(f"the {part} part of the data is empty; use more data or another data.eval_fraction")
        self.config = cfg
        self.tokenizer = None
        self.train = train
        self.eval = eval
        self.label_names = label_names
        self.pad_id = 0

    def chunked(self, model: torch.nn.Module) -> bool:
        return False

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return {self.input_key: torch.stack([f[self.input_key] for f in features]),
                "labels": torch.tensor([f["label"] for f in features], dtype=torch.long)}

    def scores(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class scores (batch, num_labels), float32."""
        x = batch[self.input_key].to(_device_of(model))
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
        return model(**{self.input_key: x.to(dtype)}).logits.float()

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        scores = self.scores(model, batch)
        return F.cross_entropy(scores, batch["labels"].to(scores.device)), len(batch["labels"])

    def _eval_batches(self, batch_size: int) -> list[list[dict]]:
        return [self.eval[s:s + batch_size] for s in range(0, len(self.eval), batch_size)]

    def _evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, float]:
        total, correct = 0.0, 0
        for features in self._eval_batches(batch_size):
            batch = self.collate(features)
            scores = self.scores(model, batch)
            y = batch["labels"].to(scores.device)
            total += float(F.cross_entropy(scores, y, reduction="sum"))
            correct += int((scores.argmax(-1) == y).sum())
        return {"loss": total / len(self.eval), "accuracy": correct / len(self.eval)}


class ImageClassificationTask(MediaClassificationTask):
    kind = KIND
    input_key = "pixel_values"


def split_parts(cfg: DataConfig, read: Any, encode: Any) -> tuple[list[dict], list[dict], list[str]]:
    """Every part of ``cfg`` read (``read(part)`` -> MediaDataset), split, subsampled and encoded (``encode(item,
    where)`` -> tensor); the parts of a mix weighted and joined. Returns (train, eval, label names)."""
    from deltatune.data import rows

    trains, evals, names = [], [], None
    for i, part in enumerate(cfg.parts()):
        try:
            ds = read(part)
            if names is not None and ds.label_names != names:
                raise DeltatuneError(f"its classes ({', '.join(ds.label_names)}) differ from the first part's "
                                     f"({', '.join(names)}); give every part the same classes (data.labels)")
            names = ds.label_names
            train, held = ds.split(part.eval_fraction, seed=part.seed)
            if part.max_train is not None and part.max_train < len(train):
                train = train.subset(part.max_train, seed=part.seed)
            if part.max_eval is not None and part.max_eval < len(held):
                held = held.subset(part.max_eval, seed=part.seed)
        except DeltatuneError as e:
            raise rows.in_part(e, cfg, i) from e
        trains.append([{"x": encode(x, f"{ds.name} example {j}"), "label": y}
                       for j, (x, y) in enumerate(zip(train.items, train.labels, strict=True))])
        evals.append([{"x": encode(x, f"{ds.name} example {j}"), "label": y}
                      for j, (x, y) in enumerate(zip(held.items, held.labels, strict=True))])
    assert names is not None
    train = trains[0] if cfg.mix is None else rows.mix(trains, [p.weight for p in cfg.parts()], cfg.seed)
    return train, [f for part in evals for f in part], names


def _renamed(features: list[dict], key: str) -> list[dict]:
    return [{key: f["x"], "label": f["label"]} for f in features]


def read_images(cfg: DataConfig) -> MediaDataset:
    return read_source(cfg, inputs=IMAGE_FIELDS, files=IMAGE_FILES, decode=decode_image, shipped=_shipped_image)


def check_model(base: torch.nn.Module, task: str, inputs: str, n_labels: int) -> None:
    from deltatune.core import architectures

    arch = architectures.of(base)
    if arch.inputs != inputs:
        raise DeltatuneError(f"task {task!r} needs a model that takes {inputs}, but {type(base).__name__} takes "
                             f"{arch.inputs}; use a {'ViT / Swin' if inputs == 'pixels' else 'AST'} classifier folder")
    if not hasattr(getattr(base, "config", None), "num_labels") or not type(base).__name__.endswith("Classification"):
        raise DeltatuneError(f"task {task!r} trains the model's classification head, but {type(base).__name__} has "
                             "none; load it with deltatune.data.tasks.load_for_task")
    if int(base.config.num_labels) != n_labels:
        raise DeltatuneError(f"the model's classification head has {base.config.num_labels} outputs but the data has "
                             f"{n_labels} classes; load it with deltatune.data.tasks.load_for_task")


def build_image_task(cfg: DataConfig, base: torch.nn.Module) -> ImageClassificationTask:
    """Read, split, subsample and encode the images for ``base`` (a ViT / Swin image classifier)."""
    return _image_task(cfg, base, read_images)


def _image_task(cfg: DataConfig, base: torch.nn.Module, read: Any) -> ImageClassificationTask:
    shape = ImageShape.of(base)
    train, held, names = split_parts(cfg, read, lambda x, where: pixel_values(x, shape, where))
    check_model(base, KIND, "pixels", len(names))
    return ImageClassificationTask(cfg, _renamed(train, "pixel_values"), _renamed(held, "pixel_values"), names)


# ---------------------------------------------------------------- the model


def load_classifier(model_name: str, kind: str, names: list[str]) -> torch.nn.Module:
    """The model of folder ``model_name`` with its image- or audio-classification head (``kind``: "image" |
    "audio") sized to ``names``, loaded offline in eval mode as ``deltatune.data.models.load`` loads models (no
    pickle; weights the folder lacks initialised from seed 0, so that the same folder always gives the same base).
    A head the folder lacks, or has with another size, is fresh: marked so that it trains fully next to any delta."""
    from transformers import AutoConfig, AutoModelForAudioClassification, AutoModelForImageClassification

    from deltatune.core import architectures

    folder = models.resolve(model_name)
    models.refuse_pickle_weights(Path(folder))
    try:
        model_type = str(AutoConfig.from_pretrained(folder, local_files_only=True).model_type)
    except (OSError, ValueError) as e:
        raise DeltatuneError(f"{folder} is not a model folder ({str(e).splitlines()[0]}); pass a save_pretrained "
                             "folder") from e
    takes = architectures.TABLE[model_type].inputs if model_type in architectures.TABLE else "tokens"
    want = "pixels" if kind == "image" else "spectrogram"
    if takes != want:
        raise DeltatuneError(f"task '{kind}-classification' needs a model that takes {want}, but {folder} holds a "
                             f"{model_type} model, which takes {takes}; use a "
                             f"{'ViT / Swin' if kind == 'image' else 'AST'} model folder")
    auto = AutoModelForImageClassification if kind == "image" else AutoModelForAudioClassification
    request = {"num_labels": len(names), "id2label": dict(enumerate(names)),
               "label2id": {n: i for i, n in enumerate(names)}}
    try:
        with torch.random.fork_rng(devices=[]), models.quiet_transformers():
            torch.manual_seed(0)
            model, info = auto.from_pretrained(folder, **request, dtype=torch.float32, local_files_only=True,
                                               use_safetensors=True, output_loading_info=True,
                                               ignore_mismatched_sizes=True)
    except (OSError, ValueError) as e:
        what = "image" if kind == "image" else "audio"
        raise DeltatuneError(f"could not load an {what}-classification model from {folder} "
                             f"({str(e).splitlines()[0]}); pass a save_pretrained folder of a ViT / Swin (images) or "
                             "AST (audio) model") from e
    params = {n for n, _ in model.named_parameters()}
    fresh = set(info.get("missing_keys") or ()) | {k[0] if isinstance(k, tuple) else k
                                                   for k in info.get("mismatched_keys") or ()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    inside = sorted(k for k in fresh if prefix and k.startswith(prefix + "."))
    if inside:
        raise DeltatuneError(f"{folder} lacks {len(inside)} weight(s) of the {type(model).__name__} body (e.g. "
                             f"{inside[0]}); pass the folder of a trained model")
    fresh_head.mark(model, [k for k in fresh if k in params])
    model.eval()
    return model


def load_image_task(cfg: DataConfig, model_name: str) -> tuple[torch.nn.Module, ImageClassificationTask]:
    """The image classifier of ``model_name`` with its head sized to the data, and the task (the data read once)."""
    read = read_once(read_images)
    model = load_classifier(model_name, "image", class_names(cfg, read))
    return model, _image_task(cfg, model, read)


def read_once(read: Any) -> Any:
    """``read`` remembering each part's examples (a model sized to the classes, then the task, read them once)."""
    seen: dict[int, MediaDataset] = {}

    def cached(part: DataConfig) -> MediaDataset:
        if id(part) not in seen:
            seen[id(part)] = read(part)
        return seen[id(part)]

    return cached


def class_names(cfg: DataConfig, read: Any) -> list[str]:
    """The classes of the first part of ``cfg`` (every part must have the same: ``split_parts`` checks)."""
    from deltatune.data import rows

    try:
        return read(cfg.parts()[0]).label_names
    except DeltatuneError as e:
        raise rows.in_part(e, cfg, 0) from e
