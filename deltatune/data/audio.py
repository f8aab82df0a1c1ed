"""``task: audio-classification``: waveforms through the model's own feature extractor to an AST classifier.

Sources, as for images (``deltatune.data.vision``, which this module builds on): a folder with one sub-folder per
class holding ``.wav`` files (read with the standard library's ``wave``: 8/16/24/32-bit PCM, channels averaged to
mono) or ``.npy`` waveforms (taken at 16 kHz); an ``.npz`` of waveforms under ``audio`` / ``waveform`` /
``array`` / ``input_values`` / ``x`` with the classes under ``label`` / ``labels`` / ``y`` (and optionally
``label_names`` and a ``sampling_rate`` scalar, default 16000); a ``.parquet`` file with such columns (each input
a list of samples, WAV file bytes, or a ``datasets`` Audio struct ``{"array", "sampling_rate"}`` / ``{"bytes"}``);
or the shipped set ``tones`` (below).

Features: ``transformers.ASTFeatureExtractor``, the AST model's own feature extractor, built without a download:
from the model folder's ``preprocessor_config.json`` when it has one, else from the model config's
``num_mel_bins`` and ``max_length`` (16 kHz, AudioSet's mean / std normalisation, its defaults). It computes
Kaldi-compatible log-mel filter banks (25 ms Hann windows every 10 ms, pre-emphasis 0.97), padded or cut to
``max_length`` frames, as ``input_values`` (frames × mel bins). With torchaudio installed it uses torchaudio's
``kaldi.fbank``; without it (as here: torchaudio is not installed) transformers' own numpy implementation of the
same filter bank. A waveform at another rate is resampled to 16 kHz by linear interpolation (crude: no
anti-aliasing filter; resample beforehand for real work).

``tones`` (``data.name: tones``): 600 clips of 0.5 s at 16 kHz, 100 per class, synthesised here from a fixed seed
(numpy's ``default_rng(0)``, so every machine makes the same samples), each at a random amplitude in [0.3, 0.9]
over Gaussian background noise of std 0.01:

- ``low-tone``: a sine at a random frequency in 200-500 Hz, random phase;
- ``high-tone``: a sine at 1.5-3 kHz;
- ``up-chirp``: linear sweeps from 300 Hz up to 3 kHz, repeated every 0.125 s;
- ``down-chirp``: the same sweeps downwards;
- ``noise``: white noise throughout;
- ``noise-bursts``: 30 ms bursts of white noise every 100 ms, silence between.

Every pattern repeats within 0.125 s, so a model that sees only the first frames (a tiny AST's ``max_length``)
still hears the class.
"""

from __future__ import annotations

import io
import wave
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltatune.data.config import DataConfig
from deltatune.data.vision import (
    MediaClassificationTask,
    MediaDataset,
    _renamed,
    check_model,
    check_shipped_kind,
    class_names,
    load_classifier,
    read_once,
    read_source,
    split_parts,
)
from deltatune.errors import DeltatuneError

KIND = "audio-classification"
RATE = 16000
AUDIO_FILES = (".wav",)
AUDIO_FIELDS = ("audio", "audios", "waveform", "array", "input_values", "x")
TONES = ("low-tone", "high-tone", "up-chirp", "down-chirp", "noise", "noise-bursts")
TONES_PER_CLASS = 100
TONES_SECONDS = 0.5


# ---------------------------------------------------------------- reading


def read_wav(source: Path | bytes, where: str) -> tuple[np.ndarray, int]:
    """A PCM WAV file (path or bytes) as a mono float32 waveform in [-1, 1] and its sample rate."""
    try:
        with wave.open(str(source) if isinstance(source, Path) else io.BytesIO(source), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError, OSError) as e:
        raise DeltatuneError(f"{where} is not a PCM WAV file the wave module reads ({e}); give 8/16/24/32-bit PCM "
                             "WAV or .npy waveforms") from e
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    else:
        raise DeltatuneError(f"{where} has {width}-byte samples; give 8/16/24/32-bit PCM WAV")
    return x.reshape(-1, channels).mean(1), rate


def decode_audio(value: Any, where: str) -> tuple[np.ndarray, int]:
    """One waveform (mono float32) and its rate from a path, WAV bytes, a datasets Audio struct, (array, rate) or
    an array of samples (taken at 16 kHz)."""
    rate = RATE
    if isinstance(value, tuple) and len(value) == 2:
        value, rate = value
    if isinstance(value, dict):
        if value.get("array") is not None:
            value, rate = value["array"], int(value.get("sampling_rate") or RATE)
        else:
            value = value.get("bytes") or value.get("path")
    if isinstance(value, str | Path):
        path = Path(value)
        if path.suffix == ".npy":
            value = np.load(path, allow_pickle=False)
        else:
            return read_wav(path, where)
    if isinstance(value, bytes):
        return read_wav(value, where)
    try:
        x = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise DeltatuneError(f"{where}: a waveform is a 1-D array of samples") from e
    if x.ndim == 2 and min(x.shape) <= 8:  # (channels, samples) or (samples, channels): mono
        x = x.mean(int(np.argmin(x.shape)))
    if x.ndim != 1 or x.size == 0:
        raise DeltatuneError(f"{where}: a waveform is a non-empty 1-D array of samples, got shape {x.shape}")
    return x, int(rate)


def synthesise_tones(per_class: int = TONES_PER_CLASS, seconds: float = TONES_SECONDS,
                     seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """The ``tones`` clips (float32 at 16 kHz) and their classes (indices into ``TONES``); see the module doc."""
    rng = np.random.default_rng(seed)
    n = int(RATE * seconds)
    t = np.arange(n) / RATE
    period = 0.125
    clips, labels = [], []
    for _ in range(per_class):
        for label, name in enumerate(TONES):
            amp = rng.uniform(0.3, 0.9)
            if name in ("low-tone", "high-tone"):
                f = rng.uniform(200, 500) if name == "low-tone" else rng.uniform(1500, 3000)
                x = np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
            elif name in ("up-chirp", "down-chirp"):
                tau = (t + rng.uniform(0, period)) % period  # time within the sweep
                f0, f1 = (300.0, 3000.0) if name == "up-chirp" else (3000.0, 300.0)
                x = np.sin(2 * np.pi * (f0 * tau + (f1 - f0) * tau * tau / (2 * period)))
            elif name == "noise":
                x = rng.standard_normal(n) / 3.0
            else:
                on = ((t + rng.uniform(0, 0.1)) % 0.1) < 0.03
                x = rng.standard_normal(n) / 3.0 * on
            clips.append((amp * x + 0.01 * rng.standard_normal(n)).astype(np.float32))
            labels.append(label)
    return clips, labels


def _shipped_audio(name: str) -> MediaDataset:
    check_shipped_kind(name, "audio")
    clips, labels = synthesise_tones()
    return MediaDataset("tones", [(c, RATE) for c in clips], labels, list(TONES))


def read_audio(cfg: DataConfig) -> MediaDataset:
    return read_source(cfg, inputs=AUDIO_FIELDS, files=AUDIO_FILES, decode=decode_audio, shipped=_shipped_audio)


# ---------------------------------------------------------------- features


def feature_extractor(model: torch.nn.Module) -> Any:
    """The AST's feature extractor: the model folder's, else one built from its config (no download)."""
    from transformers import ASTFeatureExtractor

    cfg = model.config
    folder = Path(str(getattr(cfg, "_name_or_path", "") or ""))
    if (folder / "preprocessor_config.json").is_file():
        return ASTFeatureExtractor.from_pretrained(folder, local_files_only=True)
    return ASTFeatureExtractor(num_mel_bins=int(cfg.num_mel_bins), max_length=int(cfg.max_length),
                               sampling_rate=RATE)


def resample(x: np.ndarray, rate: int, target: int = RATE) -> np.ndarray:
    """Linear-interpolation resampling (no anti-aliasing filter)."""
    if rate == target:
        return x
    if rate <= 0:
        raise DeltatuneError(f"a sampling rate of {rate} Hz is not one; give the waveform's rate")
    n = max(1, round(len(x) * target / rate))
    return np.interp(np.arange(n) * (rate / target), np.arange(len(x)), x).astype(np.float32)


def input_values(item: tuple[np.ndarray, int], extractor: Any, where: str = "a waveform") -> torch.Tensor:
    """One waveform as the model's ``input_values`` (max_length frames × num_mel_bins), float32."""
    x, rate = item
    x = resample(np.asarray(x, dtype=np.float32), rate, int(extractor.sampling_rate))
    if len(x) < 400:  # one 25 ms window at 16 kHz: the filter bank needs at least one frame
        x = np.pad(x, (0, 400 - len(x)))
    out = extractor(x, sampling_rate=int(extractor.sampling_rate), return_tensors="np")["input_values"]
    return torch.from_numpy(np.asarray(out[0], dtype=np.float32))


# ---------------------------------------------------------------- the task


class AudioClassificationTask(MediaClassificationTask):
    kind = KIND
    input_key = "input_values"


def build_audio_task(cfg: DataConfig, base: torch.nn.Module) -> AudioClassificationTask:
    """Read, split, subsample and encode the waveforms for ``base`` (an AST audio classifier)."""
    return _audio_task(cfg, base, read_audio)


def _audio_task(cfg: DataConfig, base: torch.nn.Module, read: Any) -> AudioClassificationTask:
    from deltatune.core import architectures

    if architectures.of(base).inputs != "spectrogram":  # before building an extractor from a config that has none
        check_model(base, KIND, "spectrogram", 0)
    extractor = feature_extractor(base)
    train, held, names = split_parts(cfg, read, lambda x, where: input_values(x, extractor, where))
    check_model(base, KIND, "spectrogram", len(names))
    return AudioClassificationTask(cfg, _renamed(train, "input_values"), _renamed(held, "input_values"), names)


def load_audio_task(cfg: DataConfig, model_name: str) -> tuple[torch.nn.Module, AudioClassificationTask]:
    """The audio classifier of ``model_name`` with its head sized to the data, and the task (the data read once)."""
    read = read_once(read_audio)
    model = load_classifier(model_name, "audio", class_names(cfg, read))
    return model, _audio_task(cfg, model, read)
