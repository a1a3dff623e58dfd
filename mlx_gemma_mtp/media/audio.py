"""Audio for Gemma 4 E2B/E4B: decoding clips, the log-mel features the audio tower reads, and how many audio
soft tokens a clip becomes.

Reference: transformers `models/gemma4/feature_extraction_gemma4.py` (`Gemma4AudioFeatureExtractor`, itself
numpy; reproduced here operation by operation, dtypes included) and `processing_gemma4.py`
(`Gemma4Processor.replace_audio_token`). Decoding is libsndfile's (`soundfile`: WAV, FLAC, OGG, MP3) and
resampling libsoxr's (`soxr`).

What HF does with one clip, and so what this does:
* the clip is cut to `max_length` samples (480,000 = 30 s at 16 kHz; `__call__`'s default, not a saved
  setting) before anything else: a longer clip loses its tail, silently in HF (here `AudioFeatures.truncated`);
* 20 ms frames every 10 ms (`frame_length_ms`, `hop_length_ms`), the first centred at t = 0 (semicausal
  padding); a frame exists only when its whole window is real audio. HF pads a clip to a multiple of 128
  samples and marks the extra frames invalid (features zeroed); here those frames are simply not made, so every
  returned frame is valid and equal to HF's;
* soft tokens: the tower's two stride-2 convs keep every other frame twice, so ceil(ceil(T / 2) / 2) tokens for
  T frames. This is `replace_audio_token`'s count, the placeholders `Gemma4Processor` inserts, and always the
  tower's number of valid outputs. `audio_seq_length` (750) caps only `_compute_audio_num_tokens` (vLLM's
  path); with the default `max_length` the longest clip gives 2,999 frames = 750 tokens, so the two agree.
  Were `max_length` raised, the tower would return more tokens than that cap, as in HF.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ..models.config import BOOL, NON_NEGATIVE, POSITIVE, POSITIVE_INT, Rule, check_fields

DEFAULT_SAMPLING_RATE = 16_000
PAD_TO_MULTIPLE_OF = 128  # HF's `__call__` default; only rounds `max_length` up here (no frame is padded)
FEATURE_EXTRACTOR_TYPE = "Gemma4AudioFeatureExtractor"


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def load_audio(source, sampling_rate: int = DEFAULT_SAMPLING_RATE) -> np.ndarray:
    """A mono float32 waveform (samples,) at `sampling_rate` from

    * a path (str / Path) to an audio file, or the file's bytes: anything libsndfile decodes (WAV, FLAC, OGG/Vorbis,
      Opus, MP3 with libsndfile >= 1.1);
    * a numpy array already at `sampling_rate`: (samples,) mono or (samples, channels);
    * an `(array, rate)` tuple, or a `{"array": ..., "sampling_rate": ...}` dict (HF datasets), resampled.

    Channels are averaged (downmix), then the clip is resampled with soxr (high quality) when its rate differs.
    Integer arrays are read as PCM and scaled to [-1, 1). Errors are ValueErrors that name the problem.
    """
    if not (isinstance(sampling_rate, int) and sampling_rate > 0):
        raise ValueError(f"sampling_rate must be a positive integer, got {sampling_rate!r}")
    if isinstance(source, (str, os.PathLike)):
        data, rate = _decode_file(Path(source))
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data, rate = _decode_bytes(bytes(source))
    elif isinstance(source, dict):
        if "array" not in source or "sampling_rate" not in source:
            raise ValueError(f"an audio dict needs 'array' and 'sampling_rate' keys, got {sorted(source)}")
        data, rate = _as_samples(source["array"]), source["sampling_rate"]
    elif isinstance(source, tuple):
        if len(source) != 2:
            raise ValueError(f"an audio tuple must be (array, sampling_rate), got {len(source)} items")
        data, rate = _as_samples(source[0]), source[1]
    elif isinstance(source, np.ndarray):
        data, rate = _as_samples(source), sampling_rate
    else:
        raise ValueError(  # noqa: TRY004 (callers catch ValueError for any bad input)
            f"cannot read audio from a {type(source).__name__}: pass a path, bytes, a numpy array or an "
            "(array, sampling_rate) tuple")
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer, float)) or not rate > 0:
        raise ValueError(f"the audio's sampling rate must be a positive number, got {rate!r}")
    mono = data.mean(axis=1, dtype=np.float32) if data.ndim == 2 else data  # (samples,)
    if rate != sampling_rate:
        import soxr

        mono = soxr.resample(mono, rate, sampling_rate)
    if mono.size == 0:
        raise ValueError("the audio is empty after resampling")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _decode_file(path: Path) -> tuple[np.ndarray, int]:
    if not path.exists():
        raise ValueError(f"audio file not found: {path}")
    if path.is_dir():
        raise ValueError(f"audio path is a directory, not a file: {path}")
    return _decode(path, str(path))


def _decode_bytes(data: bytes) -> tuple[np.ndarray, int]:
    if not data:
        raise ValueError("the audio bytes are empty")
    return _decode(io.BytesIO(data), f"{len(data)} bytes")


def _decode(file, what: str) -> tuple[np.ndarray, int]:
    import soundfile

    try:
        data, rate = soundfile.read(file, dtype="float32", always_2d=True)  # (frames, channels)
    except soundfile.LibsndfileError as e:
        raise ValueError(f"{what} is not audio libsndfile can decode (WAV, FLAC, OGG, MP3...): {e}") from None
    if data.shape[0] == 0:
        raise ValueError(f"{what} holds no audio samples")
    return data, int(rate)


def _as_samples(array) -> np.ndarray:
    """(samples,) or (samples, channels) float32; integer PCM scaled to [-1, 1)."""
    a = np.asarray(array)
    if a.ndim not in (1, 2):
        raise ValueError(f"an audio array must be (samples,) or (samples, channels), got shape {a.shape}")
    if a.ndim == 2 and a.shape[1] > a.shape[0]:
        raise ValueError(f"audio array of shape {a.shape} has more channels than samples: pass (samples, "
                         "channels), e.g. array.T")
    if a.size == 0:
        raise ValueError(f"the audio array is empty (shape {a.shape})")
    if np.issubdtype(a.dtype, np.signedinteger):
        a = a.astype(np.float32) / np.float32(2 ** (8 * a.dtype.itemsize - 1))
    elif not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"audio samples must be float (or signed integer PCM), got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise ValueError("the audio array holds NaN or infinite samples")
    return a


# ---------------------------------------------------------------------------------------------------------------
# Features


@dataclass
class AudioFeatures:
    features: np.ndarray  # (T, n_mels) float32 log-mel frames, all real audio
    mask: np.ndarray  # (T,) bool, True = valid frame (all True for one clip; False rows come from batching)
    num_soft_tokens: int  # audio placeholders for the prompt = the tower's valid outputs for these frames
    truncated: bool = False  # the clip was longer than `max_length` samples and lost its tail (as in HF)


def soft_token_count(num_frames: int) -> int:
    """Tokens the tower makes of `num_frames` valid frames: each stride-2 conv keeps frames 0, 2, 4, ... of the
    mask (replace_audio_token's `mask[::2][:t_out]`, twice)."""
    after_first = -(-num_frames // 2)  # ceil
    return -(-after_first // 2)


def _mel_filter_bank(num_bins: int, num_mels: int, f_min: float, f_max: float, sampling_rate: int) -> np.ndarray:
    """HTK-scale triangular filters, unnormalised, (num_bins, num_mels) float64: transformers'
    `audio_utils.mel_filter_bank(norm=None, mel_scale="htk")`, which the reference uses."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    mels = np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), num_mels + 2)
    centres = 700.0 * (np.power(10, mels / 2595.0) - 1.0)  # (num_mels + 2,) Hz
    bins = np.linspace(0, sampling_rate // 2, num_bins)  # (num_bins,) Hz; HF floors the Nyquist frequency
    slopes = centres[None, :] - bins[:, None]  # (num_bins, num_mels + 2)
    width = np.diff(centres)
    down = -slopes[:, :-2] / width[:-1]
    up = slopes[:, 2:] / width[1:]
    return np.maximum(np.zeros(1), np.minimum(down, up))


_RULES: dict[str, Rule] = {
    **dict.fromkeys(("feature_size", "sampling_rate", "max_length", "audio_seq_length"), POSITIVE_INT),
    **dict.fromkeys(("frame_length_ms", "hop_length_ms", "max_frequency", "mel_floor"), POSITIVE),
    **dict.fromkeys(("min_frequency", "dither"), NON_NEGATIVE),
    "preemphasis": (lambda v: NON_NEGATIVE[0](v) and v <= 1, "a number in [0, 1]"),
    "input_scale_factor": (lambda v: POSITIVE[0](v) or POSITIVE[0](-v), "a non-zero number"),
    "preemphasis_htk_flavor": BOOL,
    "fft_overdrive": BOOL,
    "padding_side": (lambda v: v == "right", '"right" (clips are padded at their end)'),
}


@dataclass
class AudioFeatureExtractor:
    """`Gemma4AudioFeatureExtractor` for one clip; defaults are HF's (= the released processor's settings)."""

    feature_size: int = 128  # mel bins
    sampling_rate: int = DEFAULT_SAMPLING_RATE
    frame_length_ms: float = 20.0
    hop_length_ms: float = 10.0
    min_frequency: float = 0.0
    max_frequency: float = 8000.0
    preemphasis: float = 0.0
    preemphasis_htk_flavor: bool = True
    fft_overdrive: bool = False
    dither: float = 0.0  # > 0 adds Gaussian noise: features differ run to run, as in HF
    input_scale_factor: float = 1.0
    mel_floor: float = 1e-3
    per_bin_mean: list[float] | None = None
    per_bin_stddev: list[float] | None = None
    padding_side: str = "right"
    max_length: int = 480_000  # samples; HF's __call__ truncates longer clips to this
    audio_seq_length: int = 750  # the processor's cap on soft tokens per clip (see the module doc)
    # derived in __post_init__
    frame_length: int = field(init=False)  # samples
    hop_length: int = field(init=False)
    fft_length: int = field(init=False)
    window: np.ndarray = field(init=False, repr=False, compare=False)  # (frame_length,) float32 periodic Hann
    mel_filters: np.ndarray = field(init=False, repr=False, compare=False)  # (fft_length // 2 + 1, feature_size) float64

    @classmethod
    def from_config(cls, d: dict) -> AudioFeatureExtractor:
        """From HF's saved settings: `processor_config.json` (the extractor's under "feature_extractor",
        `audio_seq_length` at the top) or a flat `preprocessor_config.json`. Absent keys take HF's defaults.

        As in HF, the saved `frame_length` / `hop_length` / `fft_length` (in samples) are ignored: HF's
        constructor re-derives them from `frame_length_ms` / `hop_length_ms`, which `save_pretrained` does not
        write, so a reloaded HF extractor always uses 20 ms / 10 ms unless those keys were added by hand."""
        if not isinstance(d, dict):
            raise ValueError(f"an audio processor config must be a JSON object, got {type(d).__name__}")  # noqa: TRY004
        settings = d.get("feature_extractor", d)
        if not isinstance(settings, dict):
            raise ValueError(f"feature_extractor must be a JSON object, got {type(settings).__name__}")  # noqa: TRY004
        kind = settings.get("feature_extractor_type", FEATURE_EXTRACTOR_TYPE)
        if kind != FEATURE_EXTRACTOR_TYPE:
            raise ValueError(f"feature_extractor_type={kind!r}: only {FEATURE_EXTRACTOR_TYPE} is supported")
        known = {f.name for f in fields(cls) if f.init}
        values = {k: v for k, v in settings.items() if k in known and k != "audio_seq_length"}
        if "audio_seq_length" in d:
            values["audio_seq_length"] = d["audio_seq_length"]
        return cls(**values)

    def __post_init__(self):
        check_fields(vars(self), _RULES, "audio feature extractor: ")
        if self.min_frequency > self.max_frequency:
            raise ValueError(f"audio feature extractor: min_frequency={self.min_frequency} exceeds "
                             f"max_frequency={self.max_frequency}")
        self.frame_length = round(self.sampling_rate * self.frame_length_ms / 1000.0)
        self.hop_length = round(self.sampling_rate * self.hop_length_ms / 1000.0)
        if self.frame_length < 2 or self.hop_length < 1:
            raise ValueError(f"audio feature extractor: frames of {self.frame_length} samples every "
                             f"{self.hop_length} are too short")
        self.fft_length = 2 ** math.ceil(math.log2(self.frame_length)) * (2 if self.fft_overdrive else 1)
        # periodic Hann (np.hanning(L + 1)[:-1]), float32 as HF stores it
        self.window = np.hanning(self.frame_length + 1)[:-1].astype(np.float32)
        self.mel_filters = _mel_filter_bank(self.fft_length // 2 + 1, self.feature_size, self.min_frequency,
                                            self.max_frequency, self.sampling_rate)
        self._norm = []  # (1, feature_size) float64 per-bin statistics, as HF reshapes them
        for name in ("per_bin_mean", "per_bin_stddev"):
            value = getattr(self, name)
            if value is not None:
                stats = np.asarray(value, dtype=np.float64)
                if stats.shape != (self.feature_size,) or not np.isfinite(stats).all():
                    raise ValueError(f"audio feature extractor: {name} must be {self.feature_size} finite "
                                     f"numbers (feature_size), got shape {stats.shape}")
                if name == "per_bin_stddev" and (stats == 0).any():
                    raise ValueError("audio feature extractor: per_bin_stddev has a zero")
            self._norm.append(None if value is None else stats.reshape(1, -1))

    @property
    def max_samples(self) -> int:
        """Clips are cut here: `max_length` rounded up to a multiple of 128, as HF's truncation does."""
        return -(-self.max_length // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF

    def num_frames(self, num_samples: int) -> int:
        """Frames (all valid) for a clip of `num_samples` samples, after truncation."""
        n = min(num_samples, self.max_samples)
        return max(0, (n + self.frame_length // 2 - (self.frame_length + 1)) // self.hop_length + 1)

    def __call__(self, waveform: np.ndarray) -> AudioFeatures:
        """Log-mel features of one mono clip at `sampling_rate` (e.g. from `load_audio`)."""
        w = np.asarray(waveform)
        if w.ndim != 1:
            raise ValueError(f"want one mono waveform (samples,), got shape {w.shape}: downmix with load_audio")
        if not np.issubdtype(w.dtype, np.floating):
            raise ValueError(f"want float samples, got dtype {w.dtype}: use load_audio")
        if w.size == 0:
            raise ValueError("the audio is empty")
        truncated = w.size > self.max_samples
        # HF pads in float32 (its batch padding casts float64 to float32), so all that follows is float32
        w = w[: self.max_samples].astype(np.float32)
        T = self.num_frames(w.size)
        if T == 0:
            need = self.frame_length + 1 - self.frame_length // 2
            raise ValueError(f"audio too short: {w.size} samples at {self.sampling_rate} Hz; one feature frame "
                             f"needs {need} ({1000 * need / self.sampling_rate:g} ms)")
        if self.dither > 0.0:
            w = w + self.dither * np.random.randn(*w.shape).astype(w.dtype)
        if self.input_scale_factor != 1.0:
            w = w * self.input_scale_factor
        # semicausal: frame_length // 2 zeros in front centre the first frame at t = 0; each frame reads
        # frame_length + 1 samples, the extra one for preemphasis
        w = np.pad(w, (self.frame_length // 2, 0))
        size = self.frame_length + 1
        frames = np.lib.stride_tricks.sliding_window_view(w, size)[:: self.hop_length][:T]  # (T, size)
        if self.preemphasis > 0.0:
            if self.preemphasis_htk_flavor:
                first = frames[:, :1] * (1.0 - self.preemphasis)
                rest = frames[:, 1:-1] - self.preemphasis * frames[:, :-2]
                frames = np.concatenate([first, rest], axis=-1)
            else:
                frames = frames[:, 1:] - self.preemphasis * frames[:, :-1]
        else:
            frames = frames[:, :-1]
        spectrum = np.abs(np.fft.rfft(frames * self.window, n=self.fft_length, axis=-1))  # (T, bins) float32
        mel = np.log(spectrum @ self.mel_filters + np.float64(self.mel_floor))  # (T, n_mels) float64
        mean, stddev = self._norm
        if mean is not None:
            mel = mel - mean
        if stddev is not None:
            mel = mel / stddev
        return AudioFeatures(features=mel.astype(np.float32), mask=np.ones(T, dtype=bool),
                             num_soft_tokens=soft_token_count(T), truncated=truncated)


def pad_features(clips: list[AudioFeatures]) -> tuple[np.ndarray, np.ndarray]:
    """Stack clips for one tower call: features (N, T_max, n_mels) zero-padded and mask (N, T_max) bool,
    as HF's batch (padded frames are zero features and False)."""
    if not clips:
        raise ValueError("no audio clips to stack")
    T = max(c.features.shape[0] for c in clips)
    features = np.zeros((len(clips), T, clips[0].features.shape[1]), dtype=np.float32)
    mask = np.zeros((len(clips), T), dtype=bool)
    for i, c in enumerate(clips):
        features[i, : len(c.features)] = c.features
        mask[i, : len(c.mask)] = c.mask
    return features, mask
