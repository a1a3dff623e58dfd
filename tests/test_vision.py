"""Gemma 4's vision tower and image processor against HF transformers (the oracle), on torch CPU in float32.

The tower tests re-draw the HF model's weights: its own init (position table of ones, tiny projections, clip bounds
at +-inf, std_bias 0 / std_scale 1) leaves a tiny tower nearly blind to where a patch is, so parity on untouched
weights would pass with x and y swapped, positions ignored, clip bounds dropped or standardization skipped. The
negative checks below show each of those mistakes moves the output by far more than the parity tolerance.
"""

from __future__ import annotations

import io
import math

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_gemma_mtp.media.image import ImageFeatures, ImageProcessor, load_image
from mlx_gemma_mtp.models.vision import VisionConfig, VisionModel, sanitize

torch = pytest.importorskip("torch")
hf = pytest.importorskip("transformers")
from transformers.models.gemma4.image_processing_pil_gemma4 import (
    Gemma4ImageProcessorPil,
    get_aspect_ratio_preserving_size,
)
from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionModel

torch.set_num_threads(1)
TOL = 1e-4  # max abs difference, relative to the output's scale (its RMS, at least 1)

# E2B/E4B-style (clipped linears, no standardization) and 26B/31B-style (standardized, plain linears) towers
E2B_STYLE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 2, "head_dim": 16, "patch_size": 4, "pooling_kernel_size": 3,
             "position_embedding_size": 64, "use_clipped_linears": True, "standardize": False}
BIG_STYLE = {"hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 12, "patch_size": 4, "pooling_kernel_size": 2,
             "position_embedding_size": 64, "use_clipped_linears": False, "standardize": True,
             "rope_parameters": {"rope_type": "axial", "rope_theta": 100.0}}


# ---- the tower ----


def grid(cols: int, rows: int) -> np.ndarray:
    """(x, y) patch positions of a rows x cols patch grid, row-major, as the processor makes them."""
    x, y = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
    return np.stack([x, y], axis=-1).reshape(-1, 2)


@torch.no_grad()
def redraw(model: Gemma4VisionModel, seed: int) -> None:
    """Weights that make a tiny tower see positions, clip for real and standardize visibly."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    for name, p in model.named_parameters(recurse=True):
        if name.endswith("position_embedding_table"):
            p.copy_(randn(*p.shape))  # as large as the patch embeddings: positions matter
        elif p.ndim == 2:  # linears: unit-scale outputs
            p.copy_(randn(*p.shape) / math.sqrt(p.shape[1]))
        else:  # RMSNorm scales
            p.copy_(1 + 0.3 * randn(*p.shape))
    for name, b in model.named_buffers():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("input_min", "output_min"):  # activations are ~N(0, 1): these clip ~10-30% of them
            b.fill_(-0.8 - 0.6 * torch.rand((), generator=g).item())
        elif leaf in ("input_max", "output_max"):
            b.fill_(0.8 + 0.6 * torch.rand((), generator=g).item())
        elif leaf == "std_bias":
            b.copy_(3 * randn(*b.shape))
        elif leaf == "std_scale":
            b.copy_((0.5 + torch.rand(*b.shape, generator=g)) / math.sqrt(b.shape[0]))


def mlx_weights(model: Gemma4VisionModel) -> dict[str, mx.array]:
    return {k: mx.array(v.detach().numpy()) for k, v in model.state_dict().items()}


def make_pair(overrides: dict, seed: int = 0) -> tuple[Gemma4VisionModel, VisionModel, VisionConfig]:
    config = hf.Gemma4VisionConfig(**overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Gemma4VisionModel(config).eval()
    redraw(model, seed)
    vc = VisionConfig.from_dict(config.to_dict())
    ours = VisionModel(vc)
    ours.load_weights(list(sanitize(mlx_weights(model)).items()), strict=True)
    return model, ours, vc


def hf_padded(model: Gemma4VisionModel, pixels: np.ndarray, positions: np.ndarray, pad_to: int) -> np.ndarray:
    """HF's output on the input padded as its processor pads (zeros at positions (-1, -1))."""
    P = pixels.shape[0]
    pv = np.concatenate([pixels, np.zeros((pad_to - P, pixels.shape[1]), np.float32)])
    pos = np.concatenate([positions, -np.ones((pad_to - P, 2), np.int64)])
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pv)[None], pixel_position_ids=torch.from_numpy(pos)[None])
    return out.last_hidden_state.float().numpy()


def run(ours: VisionModel, pixels: np.ndarray, positions: np.ndarray) -> np.ndarray:
    out = ours(mx.array(pixels)[None], mx.array(positions.astype(np.int32))[None])
    return np.array(out)


def err(a: np.ndarray, ref: np.ndarray) -> float:
    """Max abs difference in units of the reference's scale (its RMS, at least 1)."""
    assert a.shape == ref.shape
    return float(np.abs(a - ref).max() / max(1.0, float(np.sqrt((ref**2).mean()))))


SHAPES = [(6, 6), (12, 3), (3, 9), (6, 12), (9, 6)]  # (cols, rows) in patches: square, wide, tall


@pytest.mark.parametrize("style", [E2B_STYLE, BIG_STYLE], ids=["e2b_style", "26b_style"])
def test_tower_matches_hf_padded(style):
    model, ours, vc = make_pair(style)
    k = vc.pooling_kernel_size
    rng = np.random.default_rng(1)
    for cols, rows in SHAPES:
        cols, rows = cols - cols % k, rows - rows % k  # grids the processor can make for this kernel
        pixels = rng.uniform(0, 1, (cols * rows, 3 * vc.patch_size**2)).astype(np.float32)
        positions = grid(cols, rows)
        pad_to = cols * rows + 2 * k * k  # HF pads every image to its patch budget
        ref = hf_padded(model, pixels, positions, pad_to)
        out = run(ours, pixels, positions)
        assert out.shape == (cols * rows // k**2, vc.hidden_size) == ref.shape
        assert out.dtype == np.float32
        assert err(out, ref) <= TOL, (cols, rows, err(out, ref))
        # pooling follows the positions, not the row order: shuffled patches give the same soft tokens
        perm = rng.permutation(cols * rows)
        assert err(run(ours, pixels[perm], positions[perm]), ref) <= TOL


def variant(model: Gemma4VisionModel, vc: VisionConfig, edit=lambda name, w: w) -> VisionModel:
    """An MLX tower with the HF model's weights, each passed through `edit(name, weight)`."""
    ours = VisionModel(vc)
    weights = {k: edit(k, v) for k, v in sanitize(mlx_weights(model)).items()}
    ours.load_weights(list(weights.items()), strict=True)
    return ours


def unclipped(name: str, w: mx.array) -> mx.array:
    leaf = name.rsplit(".", 1)[-1]
    return mx.full(w.shape, -math.inf if leaf.endswith("_min") else math.inf) if leaf in CLIP_BOUNDS else w


CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


@pytest.mark.parametrize("style", [E2B_STYLE, BIG_STYLE], ids=["e2b_style", "26b_style"])
def test_tower_negative_checks(style):
    """Each mistake the parity test must catch changes the output by more than 100x its tolerance."""
    model, ours, vc = make_pair(style, seed=3)
    k, rng, side = vc.pooling_kernel_size, np.random.default_rng(4), 6
    pixels = rng.uniform(0, 1, (side * side, 3 * vc.patch_size**2)).astype(np.float32)
    positions = grid(side, side)  # square, so swapping x and y gives a valid grid of the same shape
    swapped = positions[:, ::-1].copy()
    ref = hf_padded(model, pixels, positions, side * side)
    assert err(run(ours, pixels, positions), ref) <= TOL
    far = 100 * TOL

    # x and y swapped (in the position table and the rope together)
    assert err(run(ours, pixels, swapped), ref) > far
    # positions ignored: permuting positions inside each pooling block leaves a position-blind tower's output
    # exactly as it was (attention is permutation-equivariant, and each block pools the same patches)
    block = (positions[:, 0] // k) + (side // k) * (positions[:, 1] // k)
    shuffled = positions.copy()
    for b in np.unique(block):
        rows = np.flatnonzero(block == b)
        shuffled[rows] = positions[np.roll(rows, 1)]
    assert err(run(ours, pixels, shuffled), ref) > far
    if vc.use_clipped_linears:  # clip bounds dropped (the HF model's bounds all clip some activations)
        assert err(run(variant(model, vc, unclipped), pixels, positions), ref) > far
    else:
        assert "input_min" not in ours.encoder.layers[0].mlp.up_proj
    if vc.standardize:  # standardization skipped
        skip = {"std_bias": mx.zeros, "std_scale": mx.ones}
        plain = variant(model, vc, lambda n, w: skip[n]((vc.hidden_size,)) if n in skip else w)
        assert err(run(plain, pixels, positions), ref) > far

    # the rope alone: with the position table zeroed in both, parity holds and an x/y swap still shows
    with torch.no_grad():
        model.patch_embedder.position_embedding_table.zero_()
    ref_rope = hf_padded(model, pixels, positions, side * side)
    rope_only = variant(model, vc)
    assert err(run(rope_only, pixels, positions), ref_rope) <= TOL
    assert err(run(rope_only, pixels, swapped), ref_rope) > far
    assert err(ref_rope, ref) > far  # and the table mattered too


def test_tower_bfloat16_keeps_hf_dtypes():
    """With bfloat16 weights the tower works in bfloat16 and returns bfloat16 (HF pools, scales and
    standardizes in float32, then casts back), within bfloat16 rounding of HF's bfloat16 and float32 runs."""
    model, _, vc = make_pair(BIG_STYLE, seed=3)
    rng = np.random.default_rng(4)
    pixels = rng.uniform(0, 1, (48, 3 * vc.patch_size**2)).astype(np.float32)
    positions = grid(8, 6)
    ref32 = hf_padded(model, pixels, positions, 48)
    ref16 = hf_padded(model.to(torch.bfloat16), pixels, positions, 48)
    ours = VisionModel(vc)
    weights = sanitize({k: v.astype(mx.bfloat16) for k, v in mlx_weights(model.float()).items()})
    ours.load_weights(list(weights.items()), strict=True)
    out = ours(mx.array(pixels)[None], mx.array(positions.astype(np.int32))[None])
    assert out.dtype == mx.bfloat16
    out = np.array(out.astype(mx.float32))
    assert err(out, ref16) < 0.15 and err(out, ref32) < 0.15  # bf16 noise here: ~0.05 for both HF and MLX


def test_tower_end_to_end_with_processors(tmp_path):
    """Both processors on one photo-like image, then both towers: the soft tokens agree."""
    model, ours, vc = make_pair(E2B_STYLE, seed=5)
    settings = {"patch_size": vc.patch_size, "max_soft_tokens": 70, "pooling_kernel_size": vc.pooling_kernel_size}
    path = tmp_path / "photo.png"
    Image.fromarray(_photo(50, 80)).save(path)
    hf_out = Gemma4ImageProcessorPil(**settings)(images=[str(path)], return_tensors="np")
    feats = ImageProcessor.from_config(settings)(path)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(hf_out["pixel_values"]),
                    pixel_position_ids=torch.from_numpy(hf_out["image_position_ids"])).last_hidden_state.numpy()
    out = run(ours, feats.pixel_values, feats.position_ids)
    assert out.shape == (feats.num_soft_tokens, vc.hidden_size) == ref.shape
    assert err(out, ref) <= TOL


def test_image_features_with_embedder():
    """HF's get_image_features (tower, then Gemma4MultimodalEmbedder) against the tower and the repo's embedder."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4MultimodalEmbedder

    from mlx_gemma_mtp.models.embedder import MultimodalEmbedder

    model, ours, vc = make_pair(E2B_STYLE, seed=7)
    torch.manual_seed(7)
    hf_embed = Gemma4MultimodalEmbedder(model.config, hf.Gemma4TextConfig(hidden_size=40)).eval()
    embed = MultimodalEmbedder(vc.hidden_size, 40, vc.rms_norm_eps)
    embed.load_weights([(k, mx.array(v.numpy())) for k, v in hf_embed.state_dict().items()], strict=True)
    pixels = np.random.default_rng(7).uniform(0, 1, (54, 3 * vc.patch_size**2)).astype(np.float32)
    positions = grid(9, 6)
    with torch.no_grad():
        ref = hf_embed(torch.from_numpy(hf_padded(model, pixels, positions, 54 + 9))).numpy()
    out = np.array(embed(ours(mx.array(pixels)[None], mx.array(positions.astype(np.int32))[None])))
    assert out.shape == (6, 40) and err(out, ref) <= TOL


def test_tower_rejects_bad_inputs():
    _, ours, vc = make_pair(BIG_STYLE)
    pixels = mx.zeros((1, 16, 3 * vc.patch_size**2))
    with pytest.raises(ValueError, match="position_ids must be"):
        ours(pixels, mx.zeros((1, 16, 3), mx.int32))
    with pytest.raises(ValueError, match="pixel_values must be"):
        ours(mx.zeros((2, 16, 48)), mx.zeros((2, 16, 2), mx.int32))
    with pytest.raises(ValueError, match="cannot pool"):
        ours(mx.zeros((1, 6, 48)), mx.zeros((1, 6, 2), mx.int32))


def test_sanitize_layouts_and_idempotence():
    model, _, vc = make_pair(E2B_STYLE)
    raw = mlx_weights(model)
    once = sanitize(raw)
    twice = sanitize(once)
    assert set(once) == set(twice) == set(raw)
    assert all(mx.array_equal(once[k], twice[k]) for k in once)
    assert "encoder.layers.0.self_attn.q_proj.input_min" in once  # clip bounds are kept

    # what a conversion may add or reshape: rotary buffers, (1,)-shaped bounds, conv-style patch projections
    w = raw["patch_embedder.input_proj.weight"]  # (D, p*p*3), features (row, column, channel)
    p, D = vc.patch_size, vc.hidden_size
    torch_conv = w.reshape(D, p, p, 3).transpose(0, 3, 1, 2)  # (D, 3, p, p)
    mlx_conv = w.reshape(D, p, p, 3)  # (D, p, p, 3)
    for conv in (torch_conv, mlx_conv):
        extra = dict(raw, **{"patch_embedder.input_proj.weight": conv,
                             "encoder.rotary_emb.inv_freq": mx.ones((4,)),
                             "encoder.layers.1.mlp.up_proj.output_max": mx.array([2.5])})
        got = sanitize(extra)
        assert set(got) == set(raw)
        assert mx.array_equal(got["patch_embedder.input_proj.weight"], w)
        assert got["encoder.layers.1.mlp.up_proj.output_max"].shape == ()
        assert sanitize(got).keys() == got.keys()
    with pytest.raises(ValueError, match="channel axis"):
        sanitize({"patch_embedder.input_proj.weight": mx.zeros((8, 3, 4, 3))})


def test_vision_config():
    hf_default = hf.Gemma4VisionConfig().to_dict()
    c = VisionConfig.from_dict(hf_default)
    assert c == VisionConfig()
    assert (c.hidden_size, c.num_hidden_layers, c.head_dim, c.rope_theta) == (768, 16, 64, 100.0)
    released_26b = {"hidden_size": 1152, "num_hidden_layers": 27, "head_dim": 72, "intermediate_size": 4304,
                    "num_attention_heads": 16, "num_key_value_heads": 16, "patch_size": 16,
                    "pooling_kernel_size": 3, "position_embedding_size": 10240, "standardize": True,
                    "use_clipped_linears": False, "default_output_length": 280, "model_type": "gemma4_vision",
                    "rope_parameters": {"rope_theta": 100.0, "rope_type": "axial"}, "something_new": [1]}
    c = VisionConfig.from_dict(released_26b)
    assert (c.hidden_size, c.head_dim, c.standardize, c.default_output_length) == (1152, 72, True, 280)
    assert VisionConfig.from_dict({"rope_theta": 50.0}).rope_theta == 50.0  # older spelling
    assert VisionConfig.from_dict({"head_dim": None, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}).head_dim == 16
    bad = [({"hidden_size": 0}, "hidden_size=0 must be a positive integer"),
           ({"hidden_size": "32"}, "hidden_size='32'"),
           ({"head_dim": 10}, "multiple of 4"),
           ({"num_attention_heads": 12, "num_key_value_heads": 5}, "must divide"),
           ({"hidden_activation": "relu"}, "hidden_activation='relu' is not supported"),
           ({"rope_parameters": {"rope_type": "default"}}, "only 'axial'"),
           ({"rope_parameters": {"rope_theta": -1}}, "rope_theta=-1"),
           ({"use_clipped_linears": "yes"}, "use_clipped_linears='yes' must be true or false")]
    for d, message in bad:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
            VisionConfig.from_dict(d)
    with pytest.raises(ValueError, match="must be a JSON object"):
        VisionConfig.from_dict([1])


# ---- the image processor ----


def _photo(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A smooth image with some noise: resampling differences would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 7 + y * 3) % 256, (x * x + y) % 256, (y * 11) % 256, (x * 5 + 128) % 256], -1)
    noisy = base[..., :channels] + rng.integers(-20, 21, (h, w, channels))
    return np.clip(noisy, 0, 255).astype(np.uint8)


TINY = {"patch_size": 4, "max_soft_tokens": 70, "pooling_kernel_size": 3}
SMALL = {"patch_size": 8, "max_soft_tokens": 140, "pooling_kernel_size": 2}
RELEASED = {"patch_size": 16, "max_soft_tokens": 280, "pooling_kernel_size": 3}


def hf_process(image, settings: dict) -> ImageFeatures:
    out = Gemma4ImageProcessorPil(**settings)(images=[image], return_tensors="np")
    n = int(out["num_soft_tokens_per_image"][0])
    P = n * settings["pooling_kernel_size"] ** 2
    pos = out["image_position_ids"][0]
    assert (pos[P:] == -1).all() and (pos[:P] >= 0).all()  # HF's padding is all after the image's patches
    return ImageFeatures(out["pixel_values"][0, :P], pos[:P], n)


def assert_same(ours: ImageFeatures, ref: ImageFeatures) -> None:
    assert ours.num_soft_tokens == ref.num_soft_tokens
    assert ours.pixel_values.dtype == np.float32 and ours.position_ids.dtype == np.int32
    assert ours.pixel_values.shape == ref.pixel_values.shape
    np.testing.assert_array_equal(ours.position_ids, ref.position_ids)
    np.testing.assert_allclose(ours.pixel_values, ref.pixel_values, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    made = {}

    def save(name, image, **kw):
        made[name] = d / name
        image.save(made[name], **kw)

    for w, h in [(64, 48), (48, 64), (300, 20), (20, 300), (1000, 7), (1, 1), (2, 3), (97, 61), (12, 12)]:
        save(f"rgb_{w}x{h}.png", Image.fromarray(_photo(h, w, seed=w * h)))
    save("grey.png", Image.fromarray(_photo(40, 30, 1)[..., 0], "L"))
    save("rgba.png", Image.fromarray(_photo(36, 52, 4), "RGBA"))
    save("la.png", Image.fromarray(_photo(30, 30, 4)[..., 2:], "LA"))
    palette = Image.fromarray(_photo(33, 45)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save("palette_transparent.png", palette, transparency=3)
    save("photo.jpg", Image.fromarray(_photo(40, 56)), quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    save("rotated.jpg", Image.fromarray(_photo(24, 60)), exif=exif.tobytes(), quality=90)
    frames = [Image.fromarray(_photo(20, 28, seed=i)).convert("P") for i in range(2)]
    save("anim.gif", frames[0], save_all=True, append_images=frames[1:])  # the first frame is the image
    save("photo.webp", Image.fromarray(_photo(45, 31)), quality=80)
    return made


@pytest.mark.parametrize("settings", [TINY, SMALL], ids=["p4k3", "p8k2"])
def test_processor_matches_hf_on_files(files, settings):
    processor = ImageProcessor.from_config(settings)
    for name, path in files.items():
        ours = processor(path)
        # HF's path loader converts with .convert("RGB"), which drops alpha; its processor's convert_to_rgb (what
        # a PIL image goes through) composites onto white, which is what load_image does for every source
        transparent = name.startswith(("rgba", "la", "palette"))
        ref = hf_process(Image.open(path) if transparent else str(path), settings)
        assert_same(ours, ref)
        upright = load_image(path)
        assert processor.num_soft_tokens(upright.height, upright.width) == ours.num_soft_tokens


def test_exif_orientation_is_applied(files):
    path = files["rotated.jpg"]
    with Image.open(path) as raw:
        assert raw.size == (60, 24)  # stored landscape
    assert load_image(path).size == (24, 60)  # shown portrait
    features = ImageProcessor.from_config(TINY)(path)
    cols, rows = features.position_ids.max(axis=0) + 1
    assert rows > cols


def test_transparency_goes_onto_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    for source in (rgba, Image.fromarray(rgba, "RGBA")):
        out = np.asarray(load_image(source))
        assert (out[:4] == [200, 0, 0]).all() and (out[4:] == 255).all()


def test_other_sources_equal_the_path(files):
    processor = ImageProcessor.from_config(TINY)
    path = files["rgb_97x61.png"]
    by_path = processor(path)
    array = np.asarray(Image.open(path))
    for source in (str(path), path.read_bytes(), Image.open(path), array, array.astype(np.float32) / 255):
        assert_same(processor(source), by_path)
    grey_path = files["grey.png"]
    grey = np.asarray(Image.open(grey_path))
    for source in (grey, grey[..., None], grey_path.read_bytes()):
        assert_same(processor(source), processor(grey_path))
    # an RGBA array: what HF's processor does with the same array (its own blend arithmetic)
    rgba = _photo(37, 23, 4)
    assert_same(processor(rgba), hf_process(rgba, TINY))


def test_real_size_token_counts():
    """The released settings (patch 16, kernel 3, 280 soft tokens): HF's counts and HF's pixels."""
    processor = ImageProcessor.from_config({"image_processor": {
        "do_convert_rgb": True, "do_normalize": False, "do_rescale": True, "do_resize": True,
        "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0], "image_processor_type": "Gemma4ImageProcessor",
        "image_seq_length": 280, "max_soft_tokens": 280, "patch_size": 16, "pooling_kernel_size": 3,
        "resample": 3, "rescale_factor": 0.00392156862745098}, "image_seq_length": 280})
    assert processor == ImageProcessor()
    for w, h in [(640, 480), (1920, 1080), (100, 2000), (2000, 100), (1, 1), (4000, 30), (333, 777)]:
        th, tw = get_aspect_ratio_preserving_size(h, w, 16, 280 * 9, 3)
        assert processor.num_soft_tokens(h, w) == (th // 16) * (tw // 16) // 9 <= 280
    for w, h in [(640, 480), (1920, 1080), (100, 2000)]:
        image = Image.fromarray(_photo(h, w, seed=h))
        ours = processor(image)
        assert ours.num_soft_tokens == processor.num_soft_tokens(h, w)
        assert_same(ours, hf_process(image, RELEASED))


def test_processor_config_styles():
    nested = ImageProcessor.from_config({"image_processor": {"max_soft_tokens": 560, "resample": 2},
                                         "feature_extractor": {"sampling_rate": 16000}})
    flat = ImageProcessor.from_config({"max_soft_tokens": 560, "resample": 2, "processor_class": "Gemma4Processor"})
    assert nested == flat and nested.max_soft_tokens == 560 and nested.resample == Image.Resampling.BILINEAR
    assert ImageProcessor.from_config({}) == ImageProcessor()
    assert ImageProcessor.from_config({"resample": "bicubic"}).resample == 3
    norm = ImageProcessor.from_config(dict(TINY, do_normalize=True, image_mean=[0.5, 0.4, 0.3], image_std=0.25))
    image = Image.fromarray(_photo(30, 50))
    ref = Gemma4ImageProcessorPil(**TINY, do_normalize=True, image_mean=[0.5, 0.4, 0.3], image_std=[0.25] * 3)
    out = ref(images=[image], return_tensors="np")
    got = norm(image)
    np.testing.assert_allclose(got.pixel_values, out["pixel_values"][0, : got.pixel_values.shape[0]], atol=1e-6)
    for bad, message in [({"max_soft_tokens": 100}, "must be one of"), ({"resample": 99}, "not a PIL filter"),
                         ({"patch_size": 0}, "patch_size=0"), ({"image_mean": [1, 2]}, "list of 3 numbers"),
                         ({"image_processor": 3}, "must be a JSON object"), ({"do_rescale": "no"}, "true or false")]:
        with pytest.raises(ValueError, match=message):
            ImageProcessor.from_config(bad)


def test_bad_images(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    truncated = tmp_path / "cut.png"
    buf = io.BytesIO()
    Image.fromarray(_photo(40, 40)).save(buf, "PNG")
    truncated.write_bytes(buf.getvalue()[:200])
    cases = [
        (tmp_path / "missing.png", "image file not found"),
        (str(tmp_path), "is not a file"),
        (tmp_path / "notes.txt", "is not an image Pillow can read"),
        (b"\x00\x01garbage", "not an image Pillow can read"),
        (truncated, "could not be decoded"),
        (Image.new("RGB", (0, 5)), "empty"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((3, 8, 8), np.uint8), "channels first"),
        (np.zeros((8, 8, 2), np.uint8), "got shape"),
        (np.zeros((8,), np.uint8), "got shape"),
        (np.zeros((8, 8, 3), np.int64), "dtype int64"),
        (np.full((8, 8, 3), 1.5, np.float32), r"values in \[0, 1\]"),
        (np.full((8, 8, 3), np.nan, np.float32), r"values in \[0, 1\]"),
        (12345, "cannot read an image from a int"),
    ]
    for source, message in cases:
        with pytest.raises(ValueError, match=message):
            load_image(source)
    with pytest.raises(ValueError, match="do_resize off"):
        ImageProcessor(do_resize=False, patch_size=4, pooling_kernel_size=3)(np.zeros((13, 12, 3), np.uint8))
    unresized = ImageProcessor(do_resize=False, patch_size=4, pooling_kernel_size=3)(np.zeros((24, 12, 3), np.uint8))
    assert unresized.num_soft_tokens == 2 and unresized.pixel_values.shape == (18, 48)
