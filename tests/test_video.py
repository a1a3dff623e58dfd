"""Video in the prompt: the video processor against HF's (frames PyAV decodes and samples, pixels, positions, the
expanded token sequence with the frames' times), the whole target with a video against HF's
`Gemma4ForConditionalGeneration`, MTP == plain, and a video through the API, the CLI, the chat REPL and the
server (official `openai` client), with the errors a client meets.

HF's `Gemma4VideoProcessor` needs torchvision, which has no CPU build on PyPI for this torch (its wheel links
CUDA's libraries), so the oracle runs HF's own functions that need no torchvision (`read_video_pyav`,
`default_sample_indices_fn`, `get_aspect_ratio_preserving_size`, `convert_video_to_patches`,
`pad_to_max_patches`, `replace_video_token`) and re-does the two torchvision steps with the torch calls
torchvision makes (`resize_image` on uint8 on a CPU: `interpolate(bicubic, antialias=True)`; the fused
rescale + normalize: `(x - 0) / 255` in float32).
"""

from __future__ import annotations

import ast
import base64
import io
import json
import types
from functools import partial
from pathlib import Path

import live_server
import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from test_chat import Out, chat_args, scripted
from test_multimodal import hf_inputs, write_media_pair

import mlx_gemma_mtp
from mlx_gemma_mtp.cli import main
from mlx_gemma_mtp.cli.chat import run_chat
from mlx_gemma_mtp.decode import encode_prompt
from mlx_gemma_mtp.media.encoder import PromptMedia
from mlx_gemma_mtp.media.video import VideoProcessor

av = pytest.importorskip("av")  # in the test extra; the library needs it only for video files
VIDEO_TYPE = 2  # HF's mm_token_type_ids for video tokens
TINY = {"patch_size": 4, "pooling_kernel_size": 2}  # the tiny towers' geometry (test_multimodal.PROCESSOR)
RELEASED = {"patch_size": 16, "pooling_kernel_size": 3}
K, MAX_TOKENS = 2, 8


# ------------------------------------------------------------------------------------------------------------
# Videos the tests write, and the HF oracle
# ------------------------------------------------------------------------------------------------------------

def frames(n: int, height: int = 16, width: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


def mp4_bytes(n: int, fps: int = 8, height: int = 16, width: int = 24, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames(n, height, width, seed):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return buffer.getvalue()


def _hf_functions(module, *names):
    """HF's functions from a module that cannot be imported without torchvision, run as HF wrote them."""
    source = Path(module).read_text()
    tree = ast.parse(source)
    picked = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    namespace = {"torch": torch, "math": __import__("math")}
    exec(compile(ast.Module(picked, type_ignores=[]), module, "exec"), namespace)  # noqa: S102
    return [namespace[name] for name in names]


GEMMA4 = Path(transformers.__file__).parent / "models" / "gemma4"
to_patches, pad_to_max_patches, target_size = _hf_functions(
    GEMMA4 / "video_processing_gemma4.py", "convert_video_to_patches", "pad_to_max_patches",
    "get_aspect_ratio_preserving_size")


def hf_video(video: np.ndarray, patch: int = 16, pooling: int = 3, soft: int = 70) -> dict:
    """Gemma4VideoProcessor._preprocess on sampled uint8 frames (F, H, W, 3), padded to the budget as HF pads."""
    x = torch.from_numpy(video).permute(0, 3, 1, 2).contiguous()  # _prepare_input_videos
    max_patches = soft * pooling**2
    h, w = target_size(x.shape[-2], x.shape[-1], patch, max_patches, pooling)
    if (h, w) != tuple(x.shape[-2:]):  # torchvision's resize_image for uint8 bicubic on a CPU
        x = torch.nn.functional.interpolate(x, size=[h, w], mode="bicubic", align_corners=False, antialias=True)
    x = (x.to(torch.float32) - 0.0) / 255.0  # the fused rescale (1/255) and normalize (mean 0, std 1)
    patches = to_patches(x, patch)
    grid = torch.stack(torch.meshgrid(torch.arange(w // patch), torch.arange(h // patch), indexing="xy"), -1)
    positions = grid.reshape(patches.shape[1], 2)[None].repeat(len(x), 1, 1)
    pixels, positions = pad_to_max_patches(patches, positions, max_patches)
    return {"pixel_values_videos": pixels, "video_position_ids": positions,
            "num_soft_tokens": patches.shape[1] // pooling**2}


def hf_expanded_ids(bundle, messages, hf_metas: list, soft: int) -> list[int]:
    """HF's Gemma4Processor text path: the template's text, each <|video|> replaced by `replace_video_token`,
    then tokenized."""
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    tok = bundle.tokenizer._tokenizer
    processor = types.SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", video_token="<|video|>")
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    pieces = text.split("<|video|>")
    for i, meta in enumerate(hf_metas):
        replacement = Gemma4Processor.replace_video_token(
            processor, {"num_soft_tokens_per_video": [soft], "video_metadata": [meta]}, 0)
        pieces[i + 1] = replacement + pieces[i + 1]
    return tok("".join(pieces), add_special_tokens=False)["input_ids"]


def hf_metadata(n_total: int, num_frames: int, fps: float | None):
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    meta = VideoMetadata(total_num_frames=n_total, fps=fps)
    meta.frames_indices = default_sample_indices_fn(meta, num_frames=num_frames)
    return meta


def video_part(source) -> dict:
    return {"type": "video", "video": source}


def chat(*parts, text: str = "what happens?") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def pair_paths(tmp_path_factory):
    made = {}

    def get(kind: str):
        if kind not in made:
            path = tmp_path_factory.mktemp(f"video-{kind}")
            overrides = {"use_bidirectional_attention": "vision"} if kind == "31b" else {}
            made[kind] = path, write_media_pair(path, kind, **overrides)
        return made[kind]

    return get


@pytest.fixture(scope="module")
def pairs(pair_paths):
    """kind -> (HF model, bundle in float32): e2b (vision + audio), 31b (bidirectional vision attention)."""
    loaded = {}

    def get(kind: str):
        if kind not in loaded:
            path, hf = pair_paths(kind)
            loaded[kind] = hf, mlx_gemma_mtp.load(path, dtype=mx.float32)
        return loaded[kind]

    return get


# ------------------------------------------------------------------------------------------------------------
# 1. The processor against HF's
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("total,num_frames", [(40, 32), (40, 5), (12, 12)])
def test_frames_and_times_equal_hf_reading_the_file(tmp_path, total, num_frames):
    from transformers.video_utils import default_sample_indices_fn, read_video_pyav

    from mlx_gemma_mtp.media.video import load_video

    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4_bytes(total, fps=8))
    ours = VideoProcessor(num_frames=num_frames, **TINY)

    video = load_video(path, ours.frame_indices)
    want, meta = read_video_pyav(str(path), partial(default_sample_indices_fn, num_frames=num_frames))
    np.testing.assert_array_equal(np.stack([np.asarray(f) for f in video.frames]), want)
    assert video.timestamps == tuple(meta.timestamps)
    assert load_video(path.read_bytes(), ours.frame_indices).timestamps == video.timestamps  # bytes alike


def test_a_video_shorter_than_num_frames_gives_all_its_frames():
    # HF's default_sample_indices_fn refuses it (num_frames > total); every frame is the useful answer
    assert VideoProcessor(**TINY).frame_indices(12, 8.0) == list(range(12))
    assert VideoProcessor(num_frames=None, fps=2.0, **TINY).frame_indices(40, 8.0) == [0, 4, 8, 12, 16, 20, 24,
                                                                                      28, 32, 36]


@pytest.mark.parametrize("settings,soft,height,width", [
    (RELEASED, 70, 288, 480), (TINY, 70, 48, 80),  # already the target size: no resize, equal to the bit
    (RELEASED, 70, 48, 80), (TINY, 70, 16, 24), (TINY, 140, 120, 90), (RELEASED, 70, 50, 70),  # resized
])
def test_pixels_and_positions_equal_hf(settings, soft, height, width):
    video = frames(3, height, width, seed=height)
    ours = VideoProcessor(max_soft_tokens=soft, **settings)((video, 4.0))
    ref = hf_video(video, settings["patch_size"], settings["pooling_kernel_size"], soft)
    n_patches = ours.pixel_values.shape[1]
    assert ours.num_soft_tokens == ref["num_soft_tokens"]
    assert (ref["video_position_ids"][:, n_patches:] == -1).all()  # HF's padding: ours is unpadded
    for f in range(len(video)):
        np.testing.assert_array_equal(ours.position_ids, ref["video_position_ids"][f, :n_patches].numpy())
    diff = np.abs(ours.pixel_values - ref["pixel_values_videos"].numpy()[:, :n_patches])
    if target_size(height, width, settings["patch_size"], soft * settings["pooling_kernel_size"] ** 2,
                   settings["pooling_kernel_size"]) == (height, width):
        assert diff.max() == 0
    else:  # Pillow's bicubic vs torch's port of it: their fixed-point rounding differs on a few values
        assert diff.max() <= 2 / 255 + 1e-7 and (diff > 0).mean() < 0.01


def test_expanded_tokens_equal_hf_processor(pairs, tmp_path):
    _, bundle = pairs("e2b")
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(mp4_bytes(40, fps=8))
    slow = frames(40, seed=3)  # 40 frames at one every 4 s: times past a minute (the last sampled: 38 -> "02:32")
    messages = chat(video_part(str(clip)), {"type": "text", "text": "and"}, video_part((list(slow), 0.25)))
    encoded = encode_prompt(bundle, messages)
    soft = bundle.media.video_processor(str(clip)).num_soft_tokens
    metas = [hf_metadata(40, 32, 8.0), hf_metadata(40, 32, 0.25)]
    rendered = [{**m, "content": [{"type": p["type"]} if p["type"] == "video" else p for p in m["content"]]}
                for m in messages]
    assert encoded.ids == hf_expanded_ids(bundle, rendered, metas, soft)
    assert bundle.tokenizer.decode(encoded.ids).count("02:32 ") == 1
    assert [s.kind for s in encoded.spans] == ["video"] * 64 and all(s.length == soft for s in encoded.spans)
    # frames without a rate are 24 per second apart, as HF assumes
    plain = encode_prompt(bundle, chat(video_part(list(frames(3)))))
    assert plain.ids == hf_expanded_ids(bundle, chat({"type": "video"}), [hf_metadata(3, 3, 24.0)], soft)


# ------------------------------------------------------------------------------------------------------------
# 2. The model with a video in the prompt
# ------------------------------------------------------------------------------------------------------------

def hf_video_inputs(encoded, max_patches: int) -> dict:
    """HF's model inputs for a prompt whose spans are all video frames (one video), padded as HF's processor."""
    kwargs = hf_inputs(type(encoded)(encoded.ids))
    frames_ = [s.inputs for s in encoded.spans]
    pixels = np.zeros((len(frames_), max_patches, frames_[0].pixel_values.shape[1]), np.float32)
    positions = np.full((len(frames_), max_patches, 2), -1, np.int64)
    for i, x in enumerate(frames_):
        pixels[i, : len(x.pixel_values)], positions[i, : len(x.position_ids)] = x.pixel_values, x.position_ids
        kwargs["mm_token_type_ids"][0, encoded.spans[i].start : encoded.spans[i].end] = VIDEO_TYPE
    kwargs.update(pixel_values_videos=torch.from_numpy(pixels), video_position_ids=torch.from_numpy(positions),
                  num_frames_per_video=torch.tensor([len(frames_)]))
    return kwargs


def our_logits(bundle, encoded) -> np.ndarray:
    n = len(encoded.ids)
    out = bundle.target.forward(mx.array(encoded.ids)[None], bundle.target.make_cache(), rows=n,
                                media=PromptMedia(encoded, bundle.media).rows(0, n))
    return np.array(out.logits[0])


@pytest.mark.parametrize("kind", ["e2b", "31b"])
def test_logits_with_a_video_equal_hf(pairs, kind):
    hf, bundle = pairs(kind)
    video = frames(3, 16, 24, seed=5)
    encoded = encode_prompt(bundle, chat(video_part((list(video), 1.0))))
    assert [s.kind for s in encoded.spans] == ["video"] * 3
    max_patches = bundle.media.video_processor.max_soft_tokens * 2**2
    with torch.no_grad():
        reference = hf(**hf_video_inputs(encoded, max_patches)).logits[0].numpy()
    np.testing.assert_allclose(our_logits(bundle, encoded), reference, atol=1e-4, rtol=0)
    # the frames and their order matter: the same prompt with the frames shuffled is far off
    shuffled = encode_prompt(bundle, chat(video_part((list(video[[2, 0, 1]]), 1.0))))
    assert shuffled.ids == encoded.ids and shuffled.keys() != encoded.keys()
    assert np.abs(our_logits(bundle, shuffled) - reference).max() > 100 * 1e-4


@pytest.mark.parametrize("kind", ["e2b", "31b"])
def test_mtp_equals_plain_with_a_video(pairs, kind):
    _, bundle = pairs(kind)
    prompt = chat(video_part((list(frames(3, 12, 20, seed=9)), 2.0)), text="describe it " * 3)
    bundle.generation.eos_token_ids = []

    def run(k, step):
        return [r.token for r in mlx_gemma_mtp.stream_generate(bundle, prompt, max_tokens=20, num_draft_tokens=k,
                                                               prefill_step_size=step)]

    plain = run(0, 4096)
    assert run(0, 7) == plain  # prefill chunks cut between frames, never inside one
    for k in (1, 3):
        assert run(k, 5) == plain


# ------------------------------------------------------------------------------------------------------------
# 3. API, prompt cache, errors
# ------------------------------------------------------------------------------------------------------------

def test_every_spelling_gives_the_same_prompt(pairs, tmp_path):
    _, bundle = pairs("31b")
    data = mp4_bytes(10, seed=2)
    (tmp_path / "a.mp4").write_bytes(data)
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    spellings = [video_part(data), video_part(str(tmp_path / "a.mp4")), {"type": "video", "path": tmp_path / "a.mp4"},
                 {"type": "video_url", "video_url": {"url": url}}, {"type": "video_url", "video_url": url}]
    assert len({tuple(encode_prompt(bundle, chat(part)).keys()) for part in spellings}) == 1


def test_prompt_cache_tells_two_same_sized_videos_apart(pairs):
    _, bundle = pairs("e2b")
    first, second = chat(video_part(mp4_bytes(6, seed=11))), chat(video_part(mp4_bytes(6, seed=12)))
    a, b = encode_prompt(bundle, first), encode_prompt(bundle, second)
    assert a.ids == b.ids and a.keys() != b.keys()

    def run(prompt, cache=None):
        return [r.token for r in mlx_gemma_mtp.stream_generate(bundle, prompt, max_tokens=8, num_draft_tokens=2,
                                                               prompt_cache=cache)]

    fresh_first, fresh_second = run(first), run(second)
    assert fresh_first != fresh_second, "the videos must change the answer for this test to mean anything"
    cache = mlx_gemma_mtp.PromptCache()
    assert run(first, cache) == fresh_first and run(second, cache) == fresh_second
    assert cache.reused <= a.spans[0].start


def test_bad_videos_are_clear_errors(pairs, monkeypatch):
    _, bundle = pairs("31b")
    cases = [(b"not a video at all", "could not be decoded"), ([], "has no frames"),
             (np.zeros((0, 8, 8, 3), np.uint8), "has no frames"), ("/no/such/clip.mp4", "video file not found"),
             ([frames(1)[0], frames(1, 20, 20)[0]], "differ in size"), ((list(frames(2)), 0), "positive"),
             (3.5, "cannot read a video from a float")]
    for source, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            encode_prompt(bundle, chat(video_part(source)))
        assert "messages[0].content[0]" in str(e.value)
    with pytest.raises(ValueError, match="nothing is fetched from the network"):
        encode_prompt(bundle, chat({"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}))
    with pytest.raises(ValueError, match="--allow-local-media"):
        encode_prompt(bundle, chat(video_part("/tmp/a.mp4")), local_files=False)
    with pytest.raises(ValueError, match="video placeholder"):  # the text spells the placeholder itself
        encode_prompt(bundle, chat(video_part(list(frames(2))), text="<|video|>"))
    monkeypatch.setitem(__import__("sys").modules, "av", None)  # PyAV missing: files need it, frames do not
    with pytest.raises(ValueError, match=r"pip install 'mlx-gemma-mtp\[video\]'"):
        encode_prompt(bundle, chat(video_part(mp4_bytes(3))))
    assert encode_prompt(bundle, chat(video_part(list(frames(2))))).spans


# ------------------------------------------------------------------------------------------------------------
# 4. CLI, chat REPL and server
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video-files") / "clip.mp4"
    path.write_bytes(mp4_bytes(9, seed=4))
    return path


@pytest.fixture(scope="module")
def stored(pair_paths):
    """The e2b pair loaded as the CLI and the server load it (dtype as stored)."""
    return mlx_gemma_mtp.load(pair_paths("e2b")[0])


def fresh(bundle, messages) -> str:
    return mlx_gemma_mtp.generate(bundle, messages, max_tokens=MAX_TOKENS, num_draft_tokens=K)


def test_cli_generate_with_a_video_equals_generate(pair_paths, stored, clip, capsys):
    path = pair_paths("e2b")[0]
    code = main(["generate", "--model", str(path), "--prompt", "what happens?", "--max-tokens", str(MAX_TOKENS),
                 "--num-draft-tokens", str(K), "--video", str(clip)])
    assert code == 0
    out, _ = capsys.readouterr()
    assert out == fresh(stored, chat(video_part(str(clip)))) + "\n"
    with pytest.raises(SystemExit, match="no such file"):  # checked before the (slow) load
        main(["generate", "--model", str(path), "--video", str(clip.parent / "missing.mp4")])


def test_chat_video_attaches_to_the_next_message(stored, clip):
    out = Out()
    session = run_chat(stored, chat_args("--max-tokens", str(MAX_TOKENS), "--num-draft-tokens", str(K)),
                       scripted([f"/video {clip}", "what happens?"], out), out)
    assert "attached clip.mp4 (video)" in out.getvalue()
    assert session.messages[0]["content"][0] == video_part(str(clip))
    assert session.messages[1]["content"] == fresh(stored, session.messages[:1])


def test_server_video_url_equals_generate(stored, clip):
    openai = pytest.importorskip("openai")
    url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    messages = chat({"type": "video_url", "video_url": {"url": url}})
    want = fresh(stored, messages)
    assert want != fresh(stored, chat(video_part(mp4_bytes(9, seed=5)))), "the video must matter"
    served = live_server.start(stored, model_name="tiny", num_draft_tokens=K)
    try:
        with live_server.client(served[0]) as client:
            r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS,
                                               temperature=0)
            assert r.choices[0].message.content == want
            assert r.usage.prompt_tokens == len(encode_prompt(stored, messages))
            local = chat({"type": "video_url", "video_url": {"url": str(clip)}})
            with pytest.raises(openai.BadRequestError, match="allow-local-media"):
                client.chat.completions.create(model="tiny", messages=local, max_tokens=2)
    finally:
        live_server.stop(*served)


def test_video_processor_settings_come_from_the_processor_file(pair_paths, tmp_path):
    import shutil

    shutil.copytree(pair_paths("31b")[0], tmp_path / "pair")
    config = tmp_path / "pair" / "processor_config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "video_processor": {"num_frames": 4, "max_soft_tokens": 140}}))
    bundle = mlx_gemma_mtp.load(tmp_path / "pair")
    processor = bundle.media.video_processor
    assert (processor.num_frames, processor.max_soft_tokens, processor.patch_size) == (4, 140, 4)
    assert len(encode_prompt(bundle, chat(video_part(list(frames(10))))).spans) == 4
