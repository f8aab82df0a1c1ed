"""``task: image-classification`` and ``task: audio-classification`` (deltatune/data/vision.py, audio.py): batches
of the model's own input shape, tiny ViT / AST backbones that learn the shipped digits / tones with LoRA through
dt.train (and Q-Adapter on digits), dt.eval on the artifact, and one-line errors for bad input."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest
import torch
import transformers as tf

import deltatune as dt
from deltatune.data import audio, vision
from deltatune.data.tasks import DataConfig, load_for_task

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE = {"name": "digits", "task": "image-classification", "max_train": 240, "max_eval": 60}
AUDIO = {"name": "tones", "task": "audio-classification", "max_train": 120, "max_eval": 30}


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> str:
    """A tiny ViT backbone (no head: the loader makes a fresh one sized to the data) on 8×8 grey images."""
    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    tf.ViTModel(tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=8, patch_size=4, num_channels=1, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0), add_pooling_layer=False).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def ast(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("ast")
    torch.manual_seed(0)
    tf.ASTModel(tf.ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             num_mel_bins=16, max_length=32, patch_size=8, frequency_stride=8, time_stride=8,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).save_pretrained(folder)
    return str(folder)


# -- batches ---------------------------------------------------------------------------------------------------------
def test_image_batches_take_the_models_shape(vit: str) -> None:
    model, tokenizer, task = load_for_task(DataConfig(**IMAGE), vit, seed=0)
    assert tokenizer is None and type(model).__name__ == "ViTForImageClassification"
    assert task.label_names == [str(d) for d in range(10)] and model.config.num_labels == 10
    assert (len(task.train), len(task.eval)) == (240, 60)
    batch = task.collate(task.train[:5])
    assert batch["pixel_values"].shape == (5, 1, 8, 8) and batch["labels"].shape == (5,)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1  # (x - 0.5) / 0.5 of [0, 1]


def test_pixel_values_resize_scale_and_repeat_channels() -> None:
    shape = vision.ImageShape(3, (4, 4), (0.5,) * 3, (0.5,) * 3)
    grey = np.full((8, 8), 255, dtype=np.uint8)  # uint8: / 255
    out = vision.pixel_values(grey, shape)
    assert out.shape == (3, 4, 4) and torch.allclose(out, torch.ones(3, 4, 4))
    rgb = np.zeros((2, 6, 3), dtype=np.float32)  # H×W×C floats taken as [0, 1], resized to 4×4
    assert torch.allclose(vision.pixel_values(rgb, shape), -torch.ones(3, 4, 4))


def test_audio_batches_are_the_feature_extractors_frames(ast: str) -> None:
    model, _, task = load_for_task(DataConfig(**AUDIO), ast, seed=0)
    assert type(model).__name__ == "ASTForAudioClassification" and task.label_names == list(audio.TONES)
    batch = task.collate(task.train[:3])
    assert batch["input_values"].shape == (3, 32, 16) and batch["labels"].shape == (3,)
    extractor = tf.ASTFeatureExtractor(num_mel_bins=16, max_length=32)
    clip = audio.synthesise_tones(per_class=1)[0][0]
    expected = extractor(clip, sampling_rate=16000, return_tensors="pt")["input_values"][0]
    assert torch.allclose(audio.input_values((clip, 16000), extractor), expected, rtol=1e-6, atol=1e-6)


def test_tones_are_the_same_on_every_call() -> None:
    a, la = audio.synthesise_tones(per_class=2)
    b, lb = audio.synthesise_tones(per_class=2)
    assert la == lb == [0, 1, 2, 3, 4, 5] * 2 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(x.shape == (8000,) and x.dtype == np.float32 for x in a)


# -- training and evaluation -----------------------------------------------------------------------------------------
def _train_accuracy(model_folder: str, data: dict, run) -> float:
    model, _, task = load_for_task(DataConfig(**data), model_folder)
    loaded = dt.load(model, run)
    task.eval = task.train
    return task.evaluate(loaded, 64)["accuracy"]


@pytest.mark.parametrize(("method", "lr"), [({"name": "lora", "r": 4, "alpha": 8}, 3e-2),
                                          ({"name": "q_adapter", "tokens": 4}, 1e-2)])
def test_a_tiny_vit_learns_digits(method: dict, lr: float, vit: str, tmp_path) -> None:
    run = tmp_path / "run"
    summary = dt.train({"model": vit, "data": IMAGE, "method": method, "output": str(run),
                        "train": {"steps": 40, "batch_size": 16, "lr": lr, "progress": False, "eval_every": 0,
                                  "save_every": 0}})
    assert summary["steps"] == 40
    assert _train_accuracy(vit, IMAGE, run) > 0.3, "well above chance (0.1) on the training digits"
    metrics = dt.eval(run, IMAGE)
    assert metrics["accuracy"] == pytest.approx(summary["final"]["eval_accuracy"], rel=1e-6)
    assert metrics["loss"] == pytest.approx(summary["final"]["eval_loss"], rel=1e-5)


def test_a_tiny_ast_learns_tones(ast: str, tmp_path) -> None:
    run = tmp_path / "run"
    summary = dt.train({"model": ast, "data": AUDIO, "method": {"name": "lora", "r": 4, "alpha": 8},
                        "output": str(run), "train": {"steps": 30, "batch_size": 16, "lr": 3e-2, "progress": False,
                                                      "eval_every": 0, "save_every": 0}})
    assert _train_accuracy(ast, AUDIO, run) > 0.4, "well above chance (1/6) on the training clips"
    assert dt.eval(run, AUDIO)["accuracy"] == pytest.approx(summary["final"]["eval_accuracy"], rel=1e-6)


# -- local files -----------------------------------------------------------------------------------------------------
def _wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def test_class_folders_npz_and_parquet_read_alike(vit: str, ast: str, tmp_path) -> None:
    images, labels = vision.load_digits_arrays()
    images, labels = images[:40], labels[:40] % 2  # two classes
    for y in (0, 1):
        (tmp_path / "img" / f"c{y}").mkdir(parents=True)
    for i, (x, y) in enumerate(zip(images, labels, strict=True)):
        np.save(tmp_path / "img" / f"c{y}" / f"{i}.npy", (x * 255).astype(np.uint8))
    np.savez(tmp_path / "img.npz", image=(images * 255).astype(np.uint8), label=np.array(["c0", "c1"])[labels])
    common = {"task": "image-classification", "eval_fraction": 0.25}
    folder = load_for_task(DataConfig(path=str(tmp_path / "img"), **common), vit).task
    npz = load_for_task(DataConfig(path=str(tmp_path / "img.npz"), **common), vit).task
    assert folder.label_names == npz.label_names == ["c0", "c1"]
    assert len(folder.train) == len(npz.train) == 30
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    clips, tone_labels = audio.synthesise_tones(per_class=4)
    pq.write_table(pa.table({"audio": [{"bytes": _wav(c), "path": None} for c in clips],
                             "label": [audio.TONES[y] for y in tone_labels]}), tmp_path / "tones.parquet")
    task = load_for_task(DataConfig(path=str(tmp_path / "tones.parquet"), task="audio-classification",
                                    eval_fraction=0.25, labels=["noise", "low-tone"]), ast).task
    assert task.label_names == ["noise", "low-tone"] and len(task.train) + len(task.eval) == 8
    assert task.collate(task.eval)["input_values"].shape == (len(task.eval), 32, 16)


# -- bad input: one line each ----------------------------------------------------------------------------------------
def _one_line(match: str, make) -> None:
    with pytest.raises(dt.DeltatuneError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_bad_input_says_what_to_fix_in_one_line(vit: str, ast: str, tmp_path) -> None:
    image = "image-classification"
    _one_line("does not exist", lambda: load_for_task(DataConfig(path=str(tmp_path / "nope"), task=image), vit))
    (tmp_path / "one" / "a").mkdir(parents=True)
    _one_line("1 class folder", lambda: load_for_task(DataConfig(path=str(tmp_path / "one"), task=image), vit))
    (tmp_path / "one" / "b").mkdir()
    _one_line("holds no", lambda: load_for_task(DataConfig(path=str(tmp_path / "one"), task=image), vit))
    _one_line("has no label '11'", lambda: load_for_task(DataConfig(**IMAGE, labels=["1", "11"]), vit))
    _one_line("holds images; set data.task: image-classification", lambda: DataConfig(name="digits"))
    _one_line("holds texts", lambda: DataConfig(name="tweets", task=image))
    _one_line("does not apply to task 'image-classification'", lambda: DataConfig(**IMAGE, packing=True))
    _one_line("takes pixels, but .* audio-spectrogram-transformer model, which takes spectrogram", lambda: load_for_task(DataConfig(**IMAGE), ast))
    _one_line("takes spectrogram, but .* vit model, which takes pixels", lambda: load_for_task(DataConfig(**AUDIO), vit))
    np.savez(tmp_path / "bad.npz", pictures=np.zeros((4, 8, 8)), label=np.arange(4))
    _one_line("no input field", lambda: load_for_task(DataConfig(path=str(tmp_path / "bad.npz"), task=image), vit))
    (tmp_path / "wav" / "a").mkdir(parents=True)
    (tmp_path / "wav" / "b").mkdir()
    (tmp_path / "wav" / "a" / "x.wav").write_bytes(b"not a wav")
    (tmp_path / "wav" / "b" / "y.wav").write_bytes(_wav(np.zeros(800)))
    _one_line("not a PCM WAV", lambda: load_for_task(DataConfig(path=str(tmp_path / "wav"),
                                                                task="audio-classification"), ast))
