"""Gemma 4 audio: the MLX audio tower (`models/audio.py`) and the feature extractor / decoding (`media/audio.py`)
against HF transformers 5.23.0 (torch CPU, float32).

The tiny towers get re-drawn weights: HF's init leaves a tiny tower's attention nearly uniform and its clip
bounds infinite, which would let a wrong relative position bias, window or clip pass. Each property the parity
test relies on has a negative check: the same comparison with that one thing wrong misses by >= 100x the
tolerance.
"""

from __future__ import annotations

import json
import math
import types

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from transformers import Gemma4AudioConfig, Gemma4AudioFeatureExtractor, Gemma4Processor
from transformers.models.gemma4 import modeling_gemma4 as hf

from mlx_gemma_mtp.media.audio import (
    AudioFeatureExtractor,
    load_audio,
    pad_features,
    soft_token_count,
)
from mlx_gemma_mtp.models.audio import AudioConfig, AudioModel, sanitize

torch.set_num_threads(1)

TOL = 1e-4  # tower, float32
WRONG = 100 * TOL  # what a deliberately wrong variant must miss HF by
FEATURE_TOL = 1e-5
N_MELS = 8  # the tiny towers' mel bins: HF sizes input_proj for n_mels == subsampling_conv_channels[0]

TOWERS = {
    # the released pattern (no right context) at toy size: 4-frame chunks, 5 frames of left context
    "released_like": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "subsampling_conv_channels": [8, 4], "conv_kernel_size": 5, "attention_chunk_size": 4,
                      "attention_context_left": 6, "attention_context_right": 0, "output_proj_dims": 24},
    # right context, an rms_norm_eps that matters, an active gradient clamp, another activation
    "lookahead": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "subsampling_conv_channels": [8, 2], "conv_kernel_size": 3, "attention_chunk_size": 3,
                  "attention_context_left": 5, "attention_context_right": 3, "output_proj_dims": 16,
                  "rms_norm_eps": 1e-3, "gradient_clipping": 2.0, "hidden_act": "gelu_pytorch_tanh"},
}


# --- tower helpers ------------------------------------------------------------------------------------------


def tower_inputs(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(features, mask) cases: a padded batch (partial last chunk), a single full clip, and clips shorter than
    one chunk or exactly filling chunks."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for N, T, valid in ((2, 91, (91, 50)), (1, 48, (48,)), (1, 37, (37,)), (1, 5, (5,))):
        x = 1.5 * torch.randn(N, T, N_MELS, generator=g)
        mask = torch.arange(T)[None] < torch.tensor(valid)[:, None]
        cases.append((x, mask))
    return cases


def redraw(model: hf.Gemma4AudioModel, seed: int) -> None:
    """Weights that make every part matter: peaky attention (large q/k and relative-position projections),
    per-dim scales and norm weights away from their init, biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("per_dim_scale"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                gain = 3.0 if any(s in name for s in ("q_proj", "k_proj", "relative_k_proj")) else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))


def set_clip_bounds(model: hf.Gemma4AudioModel, cases, frac: float = 0.7) -> None:
    """Finite clip bounds at `frac` of each clipped linear's observed input/output range, so they clip."""
    seen: dict[str, list[float]] = {}

    def record(name):
        def hook(_module, inputs, output):
            lo_in, hi_in, lo_out, hi_out = seen.get(name, [math.inf, -math.inf, math.inf, -math.inf])
            seen[name] = [min(lo_in, inputs[0].min().item()), max(hi_in, inputs[0].max().item()),
                          min(lo_out, output.min().item()), max(hi_out, output.max().item())]
        return hook

    linears = {n: m for n, m in model.named_modules() if isinstance(m, hf.Gemma4ClippableLinear)}
    handles = [m.register_forward_hook(record(n)) for n, m in linears.items()]
    with torch.no_grad():
        for x, mask in cases:
            model(x, mask)
    for h in handles:
        h.remove()
    with torch.no_grad():
        for name, m in linears.items():
            lo_in, hi_in, lo_out, hi_out = seen[name]
            m.input_min.fill_(frac * lo_in)
            m.input_max.fill_(frac * hi_in)
            m.output_min.fill_(frac * lo_out)
            m.output_max.fill_(frac * hi_out)


def hf_weights(model: hf.Gemma4AudioModel) -> dict[str, mx.array]:
    return {k: mx.array(v.detach().numpy()) for k, v in model.state_dict().items()}


def mlx_tower(config: dict, weights: dict[str, mx.array]) -> AudioModel:
    model = AudioModel(AudioConfig.from_dict(config))
    model.load_weights(list(sanitize(weights).items()), strict=True)
    return model


def run_hf(model, x, mask) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = model(x, mask)
    return out.last_hidden_state.numpy(), out.attention_mask.numpy()


def run_mlx(model, x, mask) -> tuple[np.ndarray, np.ndarray]:
    hidden, valid = model(mx.array(x.numpy()), mx.array(mask.numpy()))
    return np.array(hidden), np.array(valid)


def max_diff(model: AudioModel, ref: hf.Gemma4AudioModel, cases, only_valid: bool = False, mlx_mask=None) -> float:
    worst = 0.0
    for x, mask in cases:
        want, valid = run_hf(ref, x, mask)
        got, _ = run_mlx(model, x, mask if mlx_mask is None else mlx_mask(mask))
        d = np.abs(got - want)
        worst = max(worst, float((d[valid] if only_valid else d).max()))
    return worst


@pytest.fixture(scope="module", params=sorted(TOWERS))
def tower(request):
    config = dict(TOWERS[request.param], model_type="gemma4_audio", initializer_range=0.02)
    torch.manual_seed(0)
    ref = hf.Gemma4AudioModel(Gemma4AudioConfig(**config)).eval()
    redraw(ref, seed=2)
    cases = tower_inputs()
    set_clip_bounds(ref, cases)
    weights = hf_weights(ref)
    return types.SimpleNamespace(config=config, ref=ref, weights=weights, model=mlx_tower(config, weights),
                                 cases=cases)


# --- tower tests --------------------------------------------------------------------------------------------


def test_tower_matches_hf(tower):
    """Every output row (padding rows too) and the output mask equal HF's, for a padded batch and clips with a
    partial last chunk, one exactly filling its chunks and one shorter than a chunk."""
    for x, mask in tower.cases:
        want, want_valid = run_hf(tower.ref, x, mask)
        got, got_valid = run_mlx(tower.model, x, mask)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_array_equal(got_valid, want_valid)
        assert np.abs(got - want).max() <= TOL, (x.shape, np.abs(got - want).max())
        assert np.abs(want).max() > 1.0  # not a vanishing output


def test_tower_negative_checks(tower, monkeypatch):
    """The parity comparison catches each of these mistakes by far more than its tolerance."""
    cases = tower.cases
    assert max_diff(tower.model, tower.ref, cases) <= TOL

    # no relative position bias
    no_bias = {k: mx.zeros_like(v) if k.endswith("relative_k_proj.weight") else v for k, v in tower.weights.items()}
    assert max_diff(mlx_tower(tower.config, no_bias), tower.ref, cases) > WRONG

    # clip bounds dropped (what a loader that skips the buffers would do)
    unclipped = {k: (mx.array(math.inf if k.endswith("max") else -math.inf) if k.endswith(("_min", "_max")) else v)
                 for k, v in tower.weights.items()}
    assert max_diff(mlx_tower(tower.config, unclipped), tower.ref, cases) > WRONG

    # the padding mask ignored: compared on valid rows only
    padded = [c for c in cases if not c[1].all()]
    assert max_diff(tower.model, tower.ref, padded, only_valid=True, mlx_mask=torch.ones_like) > WRONG

    # time-reversed input
    reversed_cases = [(x.flip(1), m) for x, m in cases if m.all()]
    worst = 0.0
    for (x, mask), (xr, _) in zip([c for c in cases if c[1].all()], reversed_cases):
        want, _ = run_hf(tower.ref, x, mask)
        got, _ = run_mlx(tower.model, xr, mask)
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst > WRONG

    # HF with the window one frame wider (context_left instead of context_left - 1): the quirk matters
    original = hf.sliding_window_mask_function
    monkeypatch.setattr(hf, "sliding_window_mask_function", lambda w: original((w[0] + 1, w[1] + 1)))
    assert max_diff(tower.model, tower.ref, cases) > WRONG
    # ... and with no window at all inside each block's context
    monkeypatch.setattr(hf, "sliding_window_mask_function", lambda w: original((10**6, 10**6)))
    assert max_diff(tower.model, tower.ref, cases) > WRONG
    monkeypatch.setattr(hf, "sliding_window_mask_function", original)

    # HF with a centred (non-causal) depthwise conv
    for layer in tower.ref.layers:
        conv = layer.lconv1d.depthwise_conv1d
        k = conv.kernel_size[0]
        monkeypatch.setattr(conv, "forward", lambda x, c=conv, k=k: F.conv1d(
            F.pad(x, ((k - 1) // 2, k // 2)), c.weight, groups=c.groups))
    assert max_diff(tower.model, tower.ref, cases) > WRONG


def test_sanitize_idempotent_and_layouts(tower):
    raw = tower.weights
    once = sanitize(raw)
    twice = sanitize(once)
    assert once.keys() == twice.keys() == raw.keys()
    for k in once:
        assert once[k].shape == twice[k].shape and mx.array_equal(once[k], twice[k]), k
    c0, c1 = tower.config["subsampling_conv_channels"]
    H, k = tower.config["hidden_size"], tower.config["conv_kernel_size"]
    assert once["subsample_conv_projection.layer0.conv.weight"].shape == (c0, 3, 3, 1)
    assert once["subsample_conv_projection.layer1.conv.weight"].shape == (c1, 3, 3, c0)
    assert once["layers.0.lconv1d.depthwise_conv1d.weight"].shape == (H, k, 1)
    # the checkpoint's and mlx-vlm's prefixes, and derived buffers some exports carry
    for prefix in ("model.audio_tower.", "audio_tower."):
        extra = {f"{prefix}rel_pos_enc.inv_timescales": mx.zeros((1, 1, H // 2)),
                 f"{prefix}layers.0.self_attn.softcap": mx.array(50.0)}
        prefixed = sanitize({**{prefix + k: v for k, v in raw.items()}, **extra})
        assert prefixed.keys() == once.keys()
        assert all(mx.array_equal(prefixed[k], once[k]) for k in once)
    # the same model keeps loading strictly from sanitized-then-saved weights
    model = AudioModel(AudioConfig.from_dict(tower.config))
    model.load_weights(list(twice.items()), strict=True)
    x, mask = tower.cases[0]
    np.testing.assert_array_equal(run_mlx(model, x, mask)[0], run_mlx(tower.model, x, mask)[0])


def test_sanitize_rejects_unreadable_conv_shapes():
    with pytest.raises(ValueError, match="reads the same in torch and MLX layout"):
        sanitize({"subsample_conv_projection.layer1.conv.weight": mx.zeros((4, 3, 3, 3))})
    with pytest.raises(ValueError, match="neither torch"):
        sanitize({"subsample_conv_projection.layer0.conv.weight": mx.zeros((4, 1, 5, 5))})
    with pytest.raises(ValueError, match="not a depthwise conv weight"):
        sanitize({"layers.0.lconv1d.depthwise_conv1d.weight": mx.zeros((8, 2, 5))})


def test_audio_config_defaults_and_validation():
    hf_config = Gemma4AudioConfig()
    ours = AudioConfig.from_dict({"model_type": "gemma4_audio", "initializer_range": 0.02, "unknown": 1})
    for name in AudioConfig.__dataclass_fields__:
        want = getattr(hf_config, name)
        assert getattr(ours, name) == (tuple(want) if isinstance(want, list) else want), name
    assert AudioConfig.from_dict(hf_config.to_dict()) == ours
    for bad, match in [
        ({"hidden_size": 0}, r"audio_config.hidden_size=0 must be a positive integer"),
        ({"subsampling_conv_channels": [128]}, "a list of two positive integers"),
        ({"attention_context_right": -1}, "an integer >= 0"),
        ({"attention_logit_cap": 0}, "a positive number"),
        ({"use_clipped_linears": "yes"}, "true or false"),
        ({"hidden_act": "tanh"}, r"hidden_act='tanh'.*supported"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "must divide hidden_size=30"),
        ({"hidden_size": 9, "num_attention_heads": 3}, "must be even"),
    ]:
        with pytest.raises(ValueError, match=match):
            AudioConfig.from_dict(bad)
    with pytest.raises(ValueError, match="must be a JSON object"):
        AudioConfig.from_dict([1, 2])


def test_tower_input_errors(tower):
    x = mx.zeros((1, 16, N_MELS + 8))
    with pytest.raises(ValueError, match="mel bins"):
        tower.model(x, mx.ones((1, 16), dtype=mx.bool_))
    with pytest.raises(ValueError, match=r"want features \(N, T, n_mels\)"):
        tower.model(mx.zeros((16, N_MELS)), mx.ones((16,), dtype=mx.bool_))
    with pytest.raises(ValueError, match="no frames"):
        tower.model(mx.zeros((1, 0, N_MELS)), mx.ones((1, 0), dtype=mx.bool_))


# --- feature extractor helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_extractor():
    return Gemma4AudioFeatureExtractor()


def hf_features(extractor, waveform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HF's features and mask for one clip (a LIST of clips: a bare 1-D array is mis-read by 5.23's padding)."""
    out = extractor([waveform])
    return np.asarray(out["input_features"][0]), np.asarray(out["input_features_mask"][0])


def hf_placeholders(extractor, waveform: np.ndarray, audio_seq_length: int = 750) -> tuple[int, int]:
    """(replace_audio_token's placeholder count, _compute_audio_num_tokens' capped count) from Gemma4Processor."""
    stub = types.SimpleNamespace(boa_token="<boa>", audio_token="<audio>", eoa_token="<eoa>",
                                 feature_extractor=extractor, audio_seq_length=audio_seq_length)
    out = extractor([waveform])
    text = Gemma4Processor.replace_audio_token(stub, {"input_features_mask": out["input_features_mask"]}, 0)
    computed = Gemma4Processor._compute_audio_num_tokens(stub, waveform, extractor.sampling_rate)
    return text.count("<audio>"), computed


def assert_matches_hf(ours, extractor, waveform: np.ndarray) -> None:
    want, want_mask = hf_features(extractor, waveform)
    T = ours.features.shape[0]
    assert ours.features.dtype == np.float32 and ours.mask.all() and ours.mask.shape == (T,)
    np.testing.assert_array_equal(want_mask[:T], True)  # our frames are exactly HF's valid frames
    assert not want_mask[T:].any() and not want[T:].any()  # HF's extra frames are padding
    assert np.abs(ours.features - want[:T]).max() <= FEATURE_TOL


def chirp(n: int, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    t = np.arange(n) / rate
    noise = np.random.default_rng(seed).standard_normal(n)
    return (0.5 * np.sin(2 * np.pi * (200 + 1500 * t) * t) + 0.05 * noise).astype(np.float32)


# --- feature extractor tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [161, 200, 1000, 16_000, 16_001, 23_457])
def test_features_match_hf_from_wav(tmp_path, hf_extractor, n):
    """16 kHz mono WAV -> load_audio -> features equal to HF's valid frames; soft tokens equal the placeholders
    Gemma4Processor inserts."""
    path = tmp_path / "clip.wav"
    sf.write(path, chirp(n), 16_000, subtype="FLOAT")
    wave = load_audio(path)
    np.testing.assert_array_equal(wave, chirp(n))  # float WAV round-trips exactly
    ours = AudioFeatureExtractor()(wave)
    assert_matches_hf(ours, hf_extractor, wave)
    placeholders, computed = hf_placeholders(hf_extractor, wave)
    assert ours.num_soft_tokens == placeholders == computed == soft_token_count(len(ours.features))
    assert not ours.truncated


def test_long_clip_is_truncated_like_hf(hf_extractor):
    """HF cuts a clip to 480,000 samples (30 s) before framing: 2,999 frames, 750 tokens = audio_seq_length.
    Longer clips lose their tail; the placeholders still equal the tower's outputs."""
    extractor = AudioFeatureExtractor()
    for seconds, truncated in ((30, False), (31.5, True)):
        wave = chirp(int(seconds * 16_000), seed=3)
        ours = extractor(wave)
        assert ours.truncated is truncated
        assert ours.features.shape == (2999, 128) and ours.num_soft_tokens == 750
        assert_matches_hf(ours, hf_extractor, wave)
        assert hf_placeholders(hf_extractor, wave) == (750, 750)
    # one token's worth shorter: not capped
    assert extractor(chirp(480_000 - 640)).num_soft_tokens == 749


def test_stereo_44k1_is_downmixed_and_resampled(tmp_path, hf_extractor):
    rate, seconds = 44_100, 1.0
    t = np.arange(int(rate * seconds)) / rate
    sine = np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([0.6 * sine, 0.2 * sine], axis=1).astype(np.float32)  # mean: 0.4 sine
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, rate, subtype="FLOAT")
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1 and abs(len(wave) - 16_000) <= 1
    # soxr against the known sine, away from the edges (filter warm-up)
    t16 = np.arange(len(wave)) / 16_000
    interior = slice(200, -200)
    assert np.abs(wave[interior] - 0.4 * np.sin(2 * np.pi * 440 * t16[interior])).max() < 1e-3
    # the other sources give the same samples
    np.testing.assert_array_equal(load_audio(path.read_bytes()), wave)
    np.testing.assert_array_equal(load_audio((stereo, rate)), wave)
    np.testing.assert_array_equal(load_audio({"array": stereo, "sampling_rate": rate}), wave)
    np.testing.assert_array_equal(load_audio(str(path)), wave)
    # HF's extractor on the same resampled waveform
    ours = AudioFeatureExtractor()(wave)
    assert_matches_hf(ours, hf_extractor, wave)
    assert ours.num_soft_tokens == hf_placeholders(hf_extractor, wave)[0]


def test_pcm16_and_mono_arrays(tmp_path):
    wave = chirp(8000)
    path = tmp_path / "pcm.wav"
    sf.write(path, wave, 16_000, subtype="PCM_16")
    decoded = load_audio(path)
    assert np.abs(decoded - wave).max() < 1e-4  # 16-bit quantisation only
    pcm = (np.clip(wave, -1, 1) * 32767).astype(np.int16)
    np.testing.assert_allclose(load_audio(pcm), pcm / 32768.0, atol=1e-7)
    np.testing.assert_array_equal(load_audio(wave.astype(np.float64)), wave)


@pytest.mark.parametrize("htk", [True, False])
def test_extractor_settings_match_hf(hf_extractor, htk):
    """Non-default settings read from a processor_config.json-style dict give HF's features for the same
    settings (preemphasis both flavours, per-bin normalisation, scaling, FFT overdrive, mel range, floor)."""
    rng = np.random.default_rng(5)
    settings = {
        "feature_extractor_type": "Gemma4AudioFeatureExtractor", "feature_size": 64, "min_frequency": 60.0,
        "max_frequency": 7600.0, "preemphasis": 0.97, "preemphasis_htk_flavor": htk, "fft_overdrive": True,
        "input_scale_factor": 2.0, "mel_floor": 1e-5, "per_bin_mean": rng.normal(size=64).tolist(),
        "per_bin_stddev": (1 + rng.random(64)).tolist(), "frame_length_ms": 25.0, "hop_length_ms": 12.5,
        "frame_length": 999, "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True,
    }
    ours = AudioFeatureExtractor.from_config({"feature_extractor": settings, "audio_seq_length": 500,
                                              "processor_class": "Gemma4Processor"})
    assert ours.audio_seq_length == 500 and ours.frame_length == 400 and ours.fft_length == 1024
    flat = AudioFeatureExtractor.from_config(settings)
    assert flat.audio_seq_length == 750 and flat.hop_length == ours.hop_length == 200
    reference = Gemma4AudioFeatureExtractor(**settings)
    wave = chirp(12_345, seed=7)
    assert_matches_hf(ours(wave), reference, wave)


def test_extractor_from_saved_hf_config(tmp_path, hf_extractor):
    """HF's own saved preprocessor_config.json (frame_length etc. in samples, which HF ignores on load)."""
    hf_extractor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    ours = AudioFeatureExtractor.from_config(saved)
    assert (ours.frame_length, ours.hop_length, ours.fft_length) == (320, 160, 512)
    np.testing.assert_array_equal(ours.window, hf_extractor.window)
    assert np.abs(ours.mel_filters - hf_extractor.mel_filters).max() < 1e-12
    assert AudioFeatureExtractor.from_config({}) == AudioFeatureExtractor()


def test_pad_features_and_token_counts_meet_the_tower(tower):
    """A padded batch of extracted clips: the tower's valid outputs per clip are the placeholder counts."""
    extractor = AudioFeatureExtractor(feature_size=N_MELS)  # the tiny tower's mel bins
    clips = [extractor(chirp(n, seed=n)) for n in (4000, 9000, 1000, 6401)]
    features, mask = pad_features(clips)
    assert features.shape == (4, max(len(c.features) for c in clips), N_MELS)
    assert mask.sum(1).tolist() == [len(c.features) for c in clips]
    assert not features[0, len(clips[0].features):].any()
    _, valid = tower.model(mx.array(features), mx.array(mask))
    assert np.array(valid).sum(1).tolist() == [c.num_soft_tokens for c in clips]


def test_audio_errors(tmp_path):
    with pytest.raises(ValueError, match="audio file not found: .*missing.wav"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(ValueError, match="is a directory"):
        load_audio(tmp_path)
    (tmp_path / "notes.txt").write_text("not audio at all")
    with pytest.raises(ValueError, match="notes.txt is not audio libsndfile can decode"):
        load_audio(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="16 bytes is not audio"):
        load_audio(b"not audio at all")
    with pytest.raises(ValueError, match="audio bytes are empty"):
        load_audio(b"")
    sf.write(tmp_path / "empty.wav", np.zeros((0,), np.float32), 16_000)
    with pytest.raises(ValueError, match="holds no audio samples"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(ValueError, match="audio array is empty"):
        load_audio(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match=r"must be \(samples,\) or \(samples, channels\), got shape \(2, 3, 4\)"):
        load_audio(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="more channels than samples"):
        load_audio(np.zeros((2, 1000), np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_audio(np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="dtype bool"):
        load_audio(np.zeros(10, bool))
    with pytest.raises(ValueError, match="sampling rate must be a positive number"):
        load_audio((np.zeros(10, np.float32), 0))
    with pytest.raises(ValueError, match=r"must be \(array, sampling_rate\)"):
        load_audio((np.zeros(10, np.float32),))
    with pytest.raises(ValueError, match="cannot read audio from a list"):
        load_audio([0.0, 1.0])

    extractor = AudioFeatureExtractor()
    with pytest.raises(ValueError, match="audio too short: 100 samples at 16000 Hz; one feature frame needs 161"):
        extractor(np.zeros(100, np.float32))
    with pytest.raises(ValueError, match=r"want one mono waveform \(samples,\), got shape \(100, 2\)"):
        extractor(np.zeros((100, 2), np.float32))
    with pytest.raises(ValueError, match="want float samples"):
        extractor(np.zeros(1000, np.int16))
    with pytest.raises(ValueError, match="the audio is empty"):
        extractor(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="only Gemma4AudioFeatureExtractor"):
        AudioFeatureExtractor.from_config({"feature_extractor": {"feature_extractor_type": "WhisperFeatureExtractor"}})
    with pytest.raises(ValueError, match="per_bin_mean must be 128 finite numbers"):
        AudioFeatureExtractor.from_config({"per_bin_mean": [0.0]})
    with pytest.raises(ValueError, match='padding_side=\'left\' must be "right"'):
        AudioFeatureExtractor.from_config({"padding_side": "left"})
    with pytest.raises(ValueError, match="sampling_rate=16000.5 must be a positive integer"):
        AudioFeatureExtractor(sampling_rate=16000.5)
