"""Images and audio in the prompt, end to end: the whole target with media against HF's
`Gemma4ForConditionalGeneration` (logits and greedy tokens), MTP == plain with media prompts, the prompt cache
keyed on media content, and the errors a client meets (text-only checkpoint, no audio tower, web URLs)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import hf_oracle as oracle
import mlx.core as mx
import numpy as np
import pytest
import torch

import mlx_gemma_mtp
from mlx_gemma_mtp import PromptCache
from mlx_gemma_mtp.decode import encode_prompt
from mlx_gemma_mtp.media.encoder import PromptMedia
from mlx_gemma_mtp.testing.tokenizer import write_gemma4_tokenizer

TEMPLATE = (Path(__file__).parent / "data" / "gemma4_e2b_chat_template.jinja").read_text()
# the tiny towers' processor settings: patch 4, pooling 2 (as the oracle's vision config), few soft tokens
PROCESSOR = {"image_processor": {"patch_size": 4, "pooling_kernel_size": 2, "max_soft_tokens": 70}}
VISION, AUDIO = 1, 3  # HF's mm_token_type_ids


def write_media_pair(path: Path, kind: str, **overrides):
    target = oracle.make_target(kind, seed=0, layout="multimodal", **overrides)
    assistant = oracle.make_assistant(target, seed=1, ordered_embeddings=kind in ("e2b", "e4b"))
    oracle.save_target(target, str(path))
    oracle.save_assistant(assistant, str(path / "drafter"))
    write_gemma4_tokenizer(path, 256, TEMPLATE, media=oracle.MEDIA_TOKENS)
    (path / "processor_config.json").write_text(json.dumps(PROCESSOR))
    return target


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """kind -> (HF model, bundle): e2b (vision + audio), 31b with bidirectional image attention (vision only)."""
    made = {}

    def get(kind: str):
        if kind not in made:
            path = tmp_path_factory.mktemp(f"media-{kind}")
            overrides = {"use_bidirectional_attention": "vision"} if kind == "31b" else {}
            hf = write_media_pair(path, kind, **overrides)
            made[kind] = hf, mlx_gemma_mtp.load(path, dtype=mx.float32)
        return made[kind]

    return get


def image_bytes(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def wav_bytes(seconds: float, seed: int, rate: int = 16000) -> bytes:
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    wave = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 800) * t) + 0.05 * rng.standard_normal(t.size)
    buffer = io.BytesIO()
    soundfile.write(buffer, wave.astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


def chat(*parts, text: str = "what is this?") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def image(width=24, height=16, seed=0) -> dict:
    return {"type": "image", "image": image_bytes(width, height, seed)}


def audio(seconds=0.5, seed=0) -> dict:
    return {"type": "audio", "audio": wav_bytes(seconds, seed)}


def hf_inputs(encoded) -> dict:
    """The HF model's keyword arguments for an encoded prompt: images padded to one patch count as HF's
    processor does (padding patches at position (-1, -1)); at most one audio clip."""
    ids = torch.tensor([encoded.ids])
    types = torch.zeros_like(ids)
    kwargs, images = {"input_ids": ids}, []
    for span in encoded.spans:
        types[0, span.start : span.end] = VISION if span.kind == "image" else AUDIO
        if span.kind == "image":
            images.append(span.inputs)
        else:
            kwargs["input_features"] = torch.from_numpy(span.inputs.features)[None]
            kwargs["input_features_mask"] = torch.from_numpy(span.inputs.mask)[None]
    if images:
        P = max(x.pixel_values.shape[0] for x in images)
        pixels = np.zeros((len(images), P, images[0].pixel_values.shape[1]), np.float32)
        positions = np.full((len(images), P, 2), -1, np.int64)
        for i, x in enumerate(images):
            pixels[i, : len(x.pixel_values)], positions[i, : len(x.position_ids)] = x.pixel_values, x.position_ids
        kwargs["pixel_values"], kwargs["image_position_ids"] = torch.from_numpy(pixels), torch.from_numpy(positions)
    kwargs["mm_token_type_ids"] = types
    return kwargs


def our_logits(bundle, encoded, media: bool = True) -> np.ndarray:
    target, n = bundle.target, len(encoded.ids)
    rows = PromptMedia(encoded, bundle.media).rows(0, n) if media else None
    out = target.forward(mx.array(encoded.ids)[None], target.make_cache(), rows=n, media=rows)
    return np.array(out.logits[0])


@pytest.mark.parametrize("kind,parts", [
    ("e2b", [image()]), ("e2b", [audio()]), ("e2b", [audio(0.3, 1), image(16, 28, 2)]),
    ("31b", [image(), image(20, 20, 3)]),
])
def test_logits_with_media_equal_hf(pairs, kind, parts):
    hf, bundle = pairs(kind)
    encoded = encode_prompt(bundle, chat(*parts))
    assert len(encoded.spans) == len(parts)
    with torch.no_grad():
        reference = hf(**hf_inputs(encoded)).logits[0].numpy()
    ours = our_logits(bundle, encoded)
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
    # the media matter: the same ids without their features are far off (a test that cannot pass by accident)
    assert np.abs(our_logits(bundle, encoded, media=False) - reference).max() > 100 * 1e-4


def test_greedy_tokens_with_an_image_equal_hf_generate(pairs):
    hf, bundle = pairs("31b")
    encoded = encode_prompt(bundle, chat(image(28, 12, 5)))
    with torch.no_grad(), oracle.patch_kv_sharing_modes():
        out = hf.generate(**hf_inputs(encoded), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    reference = out[0, len(encoded.ids):].tolist()
    ours = [r.token for r in mlx_gemma_mtp.stream_generate(bundle, encoded, max_tokens=10, num_draft_tokens=0)]
    assert ours == reference


@pytest.mark.parametrize("kind", ["e2b", "31b"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_mtp_equals_plain_with_media_past_the_window(pairs, kind, k):
    _, bundle = pairs(kind)
    parts = [image(24, 16, 7), audio(0.4, 7)] if kind == "e2b" else [image(24, 16, 7), image(12, 28, 8)]
    prompt = chat(*parts, text="describe both " * 4)  # longer than the window (8) with the soft tokens
    bundle.generation.eos_token_ids = []
    plain = [r.token for r in mlx_gemma_mtp.stream_generate(bundle, prompt, max_tokens=24, num_draft_tokens=0,
                                                            prefill_step_size=5)]
    spec = [r.token for r in mlx_gemma_mtp.stream_generate(bundle, prompt, max_tokens=24, num_draft_tokens=k,
                                                           prefill_step_size=7)]
    assert spec == plain


def test_prefill_chunks_never_split_an_item(pairs):
    _, bundle = pairs("31b")
    encoded = encode_prompt(bundle, chat(image(24, 24, 1), text="x"))
    span = encoded.spans[0]
    media = PromptMedia(encoded, bundle.media)
    assert media.cut(0, span.start + 1) == span.start  # an end inside the item moves before it
    assert media.cut(span.start, span.start + 1) == span.end  # or past it when the chunk starts there
    assert media.cut(0, span.end) == span.end
    # whatever the chunk size, prefill gives the logits of one whole forward
    whole = [r.token for r in mlx_gemma_mtp.stream_generate(bundle, encoded, max_tokens=6, num_draft_tokens=0,
                                                            prefill_step_size=4096)]
    for step in (1, 3, span.length - 1):
        assert [r.token for r in mlx_gemma_mtp.stream_generate(bundle, encoded, max_tokens=6, num_draft_tokens=0,
                                                               prefill_step_size=step)] == whole


def test_prompt_cache_tells_two_same_sized_images_apart(pairs):
    _, bundle = pairs("e2b")
    first, second = chat(image(24, 16, 11)), chat(image(24, 16, 12))
    a, b = encode_prompt(bundle, first), encode_prompt(bundle, second)
    assert a.ids == b.ids and a.keys() != b.keys()  # same placeholders, different content

    def run(prompt, cache=None):
        return [r.token for r in mlx_gemma_mtp.stream_generate(bundle, prompt, max_tokens=8, num_draft_tokens=2,
                                                               prompt_cache=cache)]

    fresh_first, fresh_second = run(first), run(second)
    assert fresh_first != fresh_second, "the images must change the answer for this test to mean anything"
    cache = PromptCache()
    assert run(first, cache) == fresh_first
    assert run(second, cache) == fresh_second
    assert cache.reused <= a.spans[0].start  # nothing of the first image was reused for the second
    # the same image again is reused whole
    assert run(second, cache) == fresh_second and cache.reused > b.spans[0].end


def test_media_errors_name_the_problem(pairs, pair_dir):
    _, bundle = pairs("31b")
    with pytest.raises(ValueError, match="takes no audio"):
        encode_prompt(bundle, chat(audio()))
    with pytest.raises(ValueError, match="nothing is fetched from the network"):
        encode_prompt(bundle, chat({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}))
    with pytest.raises(ValueError, match="--allow-local-media"):
        encode_prompt(bundle, chat({"type": "image", "image": "/tmp/cat.png"}), local_files=False)
    with pytest.raises(ValueError, match=r"messages\[0\]\.content\[0\]"):
        encode_prompt(bundle, chat({"type": "image", "image": b"not an image"}))
    with pytest.raises(ValueError, match="placeholder"):  # the text spells the placeholder itself
        encode_prompt(bundle, chat(image(), text="<|image|>"))
    text_only = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    with pytest.raises(ValueError, match="takes no images or audio"):
        encode_prompt(text_only, chat(image()))


def test_content_parts_in_every_spelling_give_the_same_prompt(pairs, tmp_path):
    import base64

    _, bundle = pairs("e2b")
    png, wav = image_bytes(20, 12, 3), wav_bytes(0.3, 3)
    (tmp_path / "a.png").write_bytes(png)
    (tmp_path / "a.wav").write_bytes(wav)
    data_png = "data:image/png;base64," + base64.b64encode(png).decode()
    spellings = [
        [{"type": "image", "image": png}, {"type": "audio", "audio": wav}],
        [{"type": "image", "path": str(tmp_path / "a.png")}, {"type": "audio", "url": str(tmp_path / "a.wav")}],
        [{"type": "image_url", "image_url": {"url": data_png}},
         {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}],
        [{"type": "image_url", "image_url": data_png}, {"type": "audio", "audio": tmp_path / "a.wav"}],
    ]
    keys = {tuple(encode_prompt(bundle, chat(*parts)).keys()) for parts in spellings}
    assert len(keys) == 1
    # the order the client sent is kept: audio first is another prompt
    swapped = encode_prompt(bundle, chat(spellings[0][1], spellings[0][0]))
    assert [s.kind for s in swapped.spans] == ["audio", "image"]


def test_towers_load_on_the_first_media_prompt_only(tmp_path):
    write_media_pair(tmp_path, "31b")
    bundle = mlx_gemma_mtp.load(tmp_path)
    mlx_gemma_mtp.generate(bundle, [{"role": "user", "content": "text only"}], max_tokens=2)
    assert bundle.media._towers is None  # text-only use pays no tower memory
    mlx_gemma_mtp.generate(bundle, chat(image()), max_tokens=2)
    assert bundle.media._towers is not None


def test_processor_geometry_comes_from_the_tower(tmp_path):
    write_media_pair(tmp_path, "31b")
    (tmp_path / "processor_config.json").unlink()  # no processor file: the tower's patch 4 / pooling 2, not 16 / 3
    bundle = mlx_gemma_mtp.load(tmp_path)
    assert (bundle.media.image_processor.patch_size, bundle.media.image_processor.pooling_kernel_size) == (4, 2)
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {"patch_size": 16}}))
    with pytest.raises(ValueError, match="patch_size=16 but config.json's vision_config says 4"):
        mlx_gemma_mtp.load(tmp_path)


def test_a_clip_past_30_s_is_cut_with_a_warning(pairs):
    _, bundle = pairs("e2b")
    with pytest.warns(UserWarning, match="longer than 30 s"):
        encoded = encode_prompt(bundle, chat(audio(31.0)))
    assert encoded.spans[0].length == 750  # HF's cap: 30 s of 40 ms soft tokens


def test_an_image_part_sets_its_own_token_budget(pairs):
    """`max_soft_tokens` in the part, or OpenAI's `detail` ("low" 70, "high" 1120, "auto" the processor's): the
    image is processed with that budget, as HF's processor with `max_soft_tokens` does (the logits equal HF's),
    and a budget that is not one the model was trained with is refused, naming the part."""
    import base64

    hf, bundle = pairs("31b")
    png = image_bytes(40, 30, 5)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    default = encode_prompt(bundle, chat({"type": "image", "image": png}))  # the test processor's 70
    more = encode_prompt(bundle, chat({"type": "image", "image": png, "max_soft_tokens": 280}))
    low = encode_prompt(bundle, chat({"type": "image_url", "image_url": {"url": url, "detail": "low"}}))
    high = encode_prompt(bundle, chat({"type": "image_url", "image_url": {"url": url, "detail": "high"}}))
    auto = encode_prompt(bundle, chat({"type": "image_url", "image_url": {"url": url, "detail": "auto"}}))
    sizes = [p.spans[0].length for p in (default, more, high)]
    assert sizes[0] <= 70 < sizes[1] <= 280 < sizes[2] <= 1120, sizes
    assert low.keys() == default.keys() == auto.keys() and more.keys() != default.keys()
    with torch.no_grad():
        reference = hf(**hf_inputs(more)).logits[0].numpy()
    np.testing.assert_allclose(our_logits(bundle, more), reference, atol=1e-4, rtol=0)
    for part, message in (({"type": "image", "image": png, "max_soft_tokens": 100}, "must be one of"),
                          ({"type": "image_url", "image_url": {"url": url, "detail": "max"}}, "detail='max'"),
                          ({**audio(), "max_soft_tokens": 70}, "apply to images and videos")):
        with pytest.raises(ValueError, match=message):
            encode_prompt(bundle if "image" in part["type"] else pairs("e2b")[1], chat(part))

