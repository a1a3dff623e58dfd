"""The menu-bar app's worker thread, driven through its queues with a tiny real bundle written by the test."""

from __future__ import annotations

import io
import json
import queue
import shutil
import sys
import urllib.request

import pytest
from test_multimodal import image_bytes, wav_bytes, write_media_pair

import mlx_gemma_mtp
from apps.menubar.worker import (
    AUDIO,
    IMAGE,
    VIDEO,
    Ask,
    Attachment,
    Chunk,
    Convert,
    Converted,
    Done,
    Error,
    Loaded,
    NewChat,
    Progress,
    Select,
    ServerStarted,
    ServerStopped,
    StartServer,
    StopServer,
    Unload,
    Unloaded,
    Worker,
    attachment_kind,
    media_kinds,
    parse_convert_request,
)
from mlx_gemma_mtp.decode import encode_prompt

TIMEOUT = 60


def collect(worker: Worker, until=(Done, Error, Unloaded, Converted)) -> list:
    """Messages up to and including the first one of a type in `until`."""
    out = []
    while True:
        out.append(worker.results.get(timeout=TIMEOUT))
        if isinstance(out[-1], until):
            return out


@pytest.fixture
def bundle_dir(pair_dir):
    return pair_dir("e2b", True, "text")[0]


@pytest.fixture
def worker():
    w = Worker().start()
    yield w
    w.stop()
    assert not w.is_alive()


@pytest.mark.parametrize("num_draft_tokens", [2, 0])
def test_job_streams_chunks_in_order_then_done(worker, bundle_dir, num_draft_tokens):
    worker.submit(Select(str(bundle_dir)))
    worker.submit(Ask("Hello", max_tokens=12, num_draft_tokens=num_draft_tokens))
    messages = collect(worker)
    assert isinstance(messages[0], Progress) and isinstance(messages[1], Loaded)  # loaded lazily, on the Ask
    assert messages[1].has_drafter
    chunks, done = messages[2:-1], messages[-1]
    assert all(isinstance(m, Chunk) for m in chunks) and isinstance(done, Done)
    assert [c.generation_tokens for c in chunks] == list(range(1, len(chunks) + 1))
    # the streamed text is exactly what the library generates for the same chat
    expected = mlx_gemma_mtp.generate(mlx_gemma_mtp.load(bundle_dir), [{"role": "user", "content": "Hello"}],
                                      max_tokens=12, num_draft_tokens=num_draft_tokens)
    assert "".join(c.text for c in chunks) == done.text == expected
    stats = done.stats
    assert stats.finish_reason in ("stop", "length") and not done.cancelled
    assert stats.generation_tokens == len(chunks) and stats.prompt_tokens > 0
    if num_draft_tokens:
        assert stats.draft is not None and stats.draft.rounds > 0
        assert len(stats.draft.acceptance_per_position) == num_draft_tokens
        assert "Acceptance per draft position: 1:" in stats.summary()
    else:
        assert stats.draft is None and "off" in stats.summary()


def test_chat_history_is_resent_each_turn(worker, bundle_dir):
    worker.submit(Select(str(bundle_dir)))
    worker.submit(Ask("Hello", max_tokens=4, num_draft_tokens=0))
    first = collect(worker)[-1]
    worker.submit(Ask("And then?", max_tokens=4, num_draft_tokens=0))
    second = collect(worker)[-1]
    assert [m["role"] for m in worker.history] == ["user", "assistant", "user", "assistant"]
    assert worker.history[1]["content"] == first.text and worker.history[3]["content"] == second.text
    assert second.stats.prompt_tokens > first.stats.prompt_tokens
    assert worker.prompt_cache.reused > 0  # the reply prefilled only its new turn
    expected = mlx_gemma_mtp.generate(mlx_gemma_mtp.load(bundle_dir), worker.history[:3], max_tokens=4,
                                      num_draft_tokens=0)
    assert second.text == expected  # and still answered exactly as a fresh run
    worker.submit(NewChat())
    worker.submit(Ask("Hello", max_tokens=4, num_draft_tokens=0))
    assert collect(worker)[-1].stats.prompt_tokens == first.stats.prompt_tokens
    assert worker.prompt_cache.reused == 0  # a new chat drops the cache


class CancelAfterFirstChunk(queue.Queue):
    """Sets the cancel event the moment the first Chunk is queued (once): a deterministic mid-stream Stop."""

    cancel = None

    def put(self, item, block=True, timeout=None):
        super().put(item, block, timeout)
        if isinstance(item, Chunk) and self.cancel is not None:
            self.cancel.set()
            self.cancel = None


@pytest.mark.parametrize("num_draft_tokens", [3, 0])
def test_cancel_mid_stream_stops_within_a_round(bundle_dir, num_draft_tokens):
    results = CancelAfterFirstChunk()
    worker = Worker(results).start()
    try:
        worker.submit(Select(str(bundle_dir), preload=True))
        assert isinstance(collect(worker, until=(Loaded, Error))[-1], Loaded)
        results.cancel = worker.cancel
        worker.submit(Ask("Hello", max_tokens=150, num_draft_tokens=num_draft_tokens))
        messages = collect(worker)
        chunks, done = [m for m in messages if isinstance(m, Chunk)], messages[-1]
        assert isinstance(done, Done) and done.cancelled and done.stats.finish_reason == "cancelled"
        # the response after the Stop is not passed on and the generator is closed: no further round runs
        assert len(chunks) == 1 and done.stats.generation_tokens == 1 and done.text == chunks[0].text
        # a later job is not cancelled by the earlier Stop
        worker.submit(Ask("Hello", max_tokens=3, num_draft_tokens=num_draft_tokens))
        done = collect(worker)[-1]
        assert isinstance(done, Done) and not done.cancelled
    finally:
        worker.stop()


def test_cancel_before_generation_starts(worker, bundle_dir):
    worker.submit(Select(str(bundle_dir), preload=True))
    collect(worker, until=(Loaded,))
    worker.submit(Ask("Hello", max_tokens=50))
    worker.cancel.set()  # Stop pressed while the job waited (or the model loaded)
    done = collect(worker)[-1]
    assert isinstance(done, Done) and done.cancelled and done.stats.generation_tokens == 0
    assert worker.history == []  # nothing was said, so the turn is dropped


@pytest.mark.parametrize("breakage", ["empty", "corrupt_config"])
def test_broken_bundle_gives_error_and_the_thread_serves_the_next_job(worker, bundle_dir, tmp_path, breakage):
    broken = tmp_path / "broken"
    broken.mkdir()
    if breakage == "corrupt_config":
        (broken / "config.json").write_text("{not json")
    worker.submit(Select(str(broken), preload=True))
    error = collect(worker, until=(Error, Loaded))[-1]
    assert isinstance(error, Error) and str(broken) in error.message and "config.json" in error.message
    assert "Traceback" in error.details and error.job == "Select"
    assert worker.is_alive() and worker.bundle is None
    worker.submit(Ask("Hello", max_tokens=2))  # the broken model fails again, as an Error, on the Ask
    assert isinstance(collect(worker)[-1], Error)
    worker.submit(Select(str(bundle_dir)))
    worker.submit(Ask("Hello", max_tokens=2))
    assert isinstance(collect(worker)[-1], Done)


def test_on_without_drafter_and_no_model_are_errors(worker, tmp_path, bundle_dir):
    worker.submit(Ask("Hello"))
    assert "No model selected" in collect(worker)[-1].message
    plain = tmp_path / "plain"
    shutil.copytree(bundle_dir, plain, ignore=shutil.ignore_patterns("drafter"))
    worker.submit(Select(str(plain)))
    worker.submit(Ask("Hello", max_tokens=2, num_draft_tokens=3))
    assert "no drafter" in collect(worker)[-1].message
    worker.submit(Ask("Hello", max_tokens=2, num_draft_tokens="auto"))  # auto falls back to plain decoding
    done = collect(worker)[-1]
    assert isinstance(done, Done) and done.stats.draft is None


def test_unload_frees_the_model(worker, bundle_dir):
    worker.submit(Select(str(bundle_dir), preload=True))
    collect(worker, until=(Loaded,))
    assert worker.bundle is not None
    worker.submit(Unload())
    assert isinstance(collect(worker)[-1], Unloaded)
    assert worker.bundle is None
    worker.submit(Ask("Hello", max_tokens=2))  # reloads lazily
    kinds = [type(m) for m in collect(worker)]
    assert Loaded in kinds and kinds[-1] is Done


def test_convert_runs_the_converter_in_the_worker(worker, bundle_dir, tmp_path):
    job = parse_convert_request(f"{bundle_dir} --quantize", tmp_path)  # a local HF folder works like a hub id
    assert job == Convert(str(bundle_dir), str(tmp_path / f"{bundle_dir.name}-mlx-q"), None, True)
    worker.submit(job)
    messages = collect(worker)
    assert isinstance(messages[0], Progress) and messages[-1] == Converted(job.out_dir)
    worker.submit(Select(job.out_dir))
    worker.submit(Ask("Hello", max_tokens=4, num_draft_tokens=2))
    done = collect(worker)[-1]
    assert isinstance(done, Done) and done.stats.draft is not None  # the bundle kept its drafter
    worker.submit(job)  # the converter refuses to overwrite: an Error, and the worker lives on
    error = collect(worker)[-1]
    assert isinstance(error, Error) and error.job == "Convert" and job.out_dir in error.message
    assert worker.is_alive()


def test_parse_convert_request(tmp_path):
    job = parse_convert_request("google/gemma-4-E2B-it google/gemma-4-E2B-it-assistant", tmp_path)
    assert job == Convert("google/gemma-4-E2B-it", str(tmp_path / "gemma-4-E2B-it-mlx"),
                          "google/gemma-4-E2B-it-assistant", False)


@pytest.mark.parametrize("text", ["", "gemma", "a/b c/d e/f", "not a/hub id"])
def test_parse_convert_request_rejects_bad_input(text, tmp_path):
    with pytest.raises(ValueError):
        parse_convert_request(text, tmp_path)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        return json.loads(response.read())


def test_the_local_server_shares_the_model_and_stops_with_it(worker, bundle_dir):
    worker.submit(Select(str(bundle_dir)))
    worker.submit(StartServer(0))  # any free port
    started = collect(worker, until=(ServerStarted, Error))[-1]
    assert isinstance(started, ServerStarted) and started.url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(started.url.removesuffix("/v1") + "/health", timeout=TIMEOUT) as r:
        assert r.status == 200
    messages = [{"role": "user", "content": "Hello"}]
    reply = _post(started.url + "/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0})
    expected = mlx_gemma_mtp.generate(mlx_gemma_mtp.load(bundle_dir), messages, max_tokens=6, num_draft_tokens=0)
    assert reply["choices"][0]["message"]["content"] == expected
    worker.submit(Ask("Hello", max_tokens=6, num_draft_tokens=0))  # the menu's questions still work alongside
    assert collect(worker)[-1].text == expected
    worker.submit(Unload())  # the server serves the loaded model: it stops with it
    assert [type(m) for m in collect(worker)] == [ServerStopped, Unloaded]
    with pytest.raises(OSError):
        urllib.request.urlopen(started.url.removesuffix("/v1") + "/health", timeout=5)
    worker.submit(StartServer(0))
    assert isinstance(collect(worker, until=(ServerStarted, Error))[-1], ServerStarted)
    worker.submit(StopServer())
    assert isinstance(collect(worker, until=(ServerStopped, Error))[-1], ServerStopped)


# --- attachments: images and audio with a question, on a tiny multimodal checkpoint (vision + audio towers) ---


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("media-e2b")
    write_media_pair(path, "e2b")
    return path


@pytest.fixture
def files(tmp_path):
    """A PNG and a WAV written to disk, with their bytes."""
    png, wav = image_bytes(24, 16, 0), wav_bytes(0.4, 0)
    (tmp_path / "cat.png").write_bytes(png)
    (tmp_path / "clip.wav").write_bytes(wav)
    return {"png": png, "wav": wav, "png_path": str(tmp_path / "cat.png"), "wav_path": str(tmp_path / "clip.wav")}


def user(text, *parts):
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def test_an_image_goes_with_the_question_and_stays_in_the_chat(worker, media_dir, files):
    worker.submit(Select(str(media_dir)))
    cat = Attachment(IMAGE, files["png_path"], "cat.png")
    worker.submit(Ask("what is this?", max_tokens=8, num_draft_tokens=2, attachments=(cat,)))
    first = collect(worker)[-1]
    assert isinstance(first, Done) and not first.cancelled
    bundle = mlx_gemma_mtp.load(media_dir)
    image_part = {"type": "image", "image": files["png"]}  # the worker read the file: the chat holds its bytes
    assert worker.history[0] == user("what is this?", image_part)
    assert first.text == mlx_gemma_mtp.generate(bundle, [user("what is this?", image_part)], max_tokens=8,
                                                num_draft_tokens=2)
    # the image matters (else the checks below could pass with it dropped)
    other = user("what is this?", {"type": "image", "image": image_bytes(24, 16, 1)})
    assert mlx_gemma_mtp.generate(bundle, [other], max_tokens=8, num_draft_tokens=2) != first.text
    # a reply: the image is still in the history, and its soft tokens come from the chat's prompt cache
    worker.submit(Ask("and the colours?", max_tokens=8, num_draft_tokens=2))
    second = collect(worker)[-1]
    assert isinstance(second, Done) and [m["role"] for m in worker.history] == ["user", "assistant"] * 2
    image_end = encode_prompt(bundle, worker.history[:1]).spans[0].end
    assert second.stats.cached_tokens == worker.prompt_cache.reused > image_end
    assert "reused from the chat's cache" in second.stats.summary()
    assert second.text == mlx_gemma_mtp.generate(bundle, worker.history[:3], max_tokens=8, num_draft_tokens=2)
    # the same image pasted (its bytes) in a new chat answers as the file did
    worker.submit(NewChat())
    pasted = Attachment(IMAGE, files["png"], "Pasted image 1")
    worker.submit(Ask("what is this?", max_tokens=8, num_draft_tokens=2, attachments=(pasted,)))
    again = collect(worker)[-1]
    assert isinstance(again, Done) and again.text == first.text and again.stats.cached_tokens == 0


def test_audio_and_images_keep_their_order(worker, media_dir, files):
    worker.submit(Select(str(media_dir)))
    attachments = (Attachment(AUDIO, files["wav_path"], "clip.wav"), Attachment(IMAGE, files["png"], "cat.png"))
    worker.submit(Ask("describe both", max_tokens=6, num_draft_tokens=0, attachments=attachments))
    done = collect(worker)[-1]
    parts = [{"type": "audio", "audio": files["wav"]}, {"type": "image", "image": files["png"]}]
    assert isinstance(done, Done) and worker.history[0] == user("describe both", *parts)
    expected = mlx_gemma_mtp.generate(mlx_gemma_mtp.load(media_dir), [user("describe both", *parts)],
                                      max_tokens=6, num_draft_tokens=0)
    assert done.text == expected


def test_a_failed_attachment_leaves_the_chat_as_it_was(worker, media_dir, files, tmp_path):
    worker.submit(Select(str(media_dir)))
    worker.submit(Ask("Hello", max_tokens=4, num_draft_tokens=0))
    assert isinstance(collect(worker)[-1], Done)
    history = list(worker.history)
    (tmp_path / "notes.png").write_text("not an image")
    failures = {  # attachment -> what the error says
        Attachment(IMAGE, str(tmp_path / "missing.png"), "missing.png"): "missing.png: could not read",
        Attachment(IMAGE, str(tmp_path / "notes.png"), "notes.png"): "notes.png: ",
        Attachment(AUDIO, b"not audio", "Recording 1"): "Recording 1: ",
    }
    for attachment, message in failures.items():
        good = Attachment(IMAGE, files["png"], "cat.png")
        worker.submit(Ask("what is this?", max_tokens=4, attachments=(good, attachment)))
        error = collect(worker)[-1]
        assert isinstance(error, Error) and error.job == "Ask" and message in error.message
        assert "messages[" not in error.message  # the library's part index is replaced by the menu's name
        assert worker.history == history and worker.is_alive()
    worker.submit(Ask("And then?", max_tokens=4, num_draft_tokens=0))  # the next question works, same chat
    done = collect(worker)[-1]
    assert isinstance(done, Done) and worker.history[:2] == history and len(worker.history) == 4
    expected = mlx_gemma_mtp.generate(mlx_gemma_mtp.load(media_dir), worker.history[:3], max_tokens=4,
                                      num_draft_tokens=0)
    assert done.text == expected


def test_media_on_a_model_without_its_tower_is_an_error(worker, bundle_dir, media_dir, files, tmp_path):
    worker.submit(Select(str(bundle_dir)))  # the text-only pair: no vision tower
    worker.submit(Ask("what is this?", max_tokens=4, attachments=(Attachment(IMAGE, files["png"], "cat.png"),)))
    error = collect(worker)[-1]
    assert isinstance(error, Error) and "takes no images" in error.message and "vision tower" in error.message
    assert worker.history == []
    worker.submit(Ask("what is this?", max_tokens=4, attachments=(Attachment(VIDEO, b"", "film.mp4"),)))
    assert "takes no images, video or audio" in collect(worker)[-1].message  # refused before decoding
    worker.submit(Ask("Hello", max_tokens=2))
    assert isinstance(collect(worker)[-1], Done)
    # a vision-only checkpoint (as 26B / 31B): images work, audio is refused by name
    vision_only = tmp_path / "vision-only"
    shutil.copytree(media_dir, vision_only)
    config = json.loads((vision_only / "config.json").read_text())
    del config["audio_config"]
    (vision_only / "config.json").write_text(json.dumps(config))
    assert media_kinds(vision_only) == (IMAGE, VIDEO)  # the vision tower reads a video's frames
    worker.submit(Select(str(vision_only)))
    clip = Attachment(AUDIO, files["wav_path"], "clip.wav")
    worker.submit(Ask("what is this?", max_tokens=4, attachments=(clip,)))
    error = collect(worker)[-1]
    assert isinstance(error, Error) and "takes no audio" in error.message and "clip.wav" in error.message
    worker.submit(Ask("what is this?", max_tokens=4, attachments=(Attachment(IMAGE, files["png"], "cat.png"),)))
    assert isinstance(collect(worker)[-1], Done)


def test_attachment_kinds_and_model_media(media_dir, bundle_dir, tmp_path):
    assert [attachment_kind(n) for n in ("a.PNG", "b.jpeg", "c.wav", "d.mp3", "e.txt", "f")] == [
        IMAGE, IMAGE, AUDIO, AUDIO, None, None]
    videos = ("a.mp4", "b.M4V", "c.mov", "d.webm", "e.mkv", "f.avi")
    assert [attachment_kind(n) for n in videos] == [VIDEO] * 6 and attachment_kind("g.gif") == IMAGE
    assert media_kinds(media_dir) == (IMAGE, VIDEO, AUDIO) and media_kinds(bundle_dir) == ()
    assert media_kinds(None) == media_kinds(tmp_path / "missing") == (IMAGE, VIDEO, AUDIO)  # unknown: the Ask tells
    assert Attachment(VIDEO, b"", "film.mp4").kind == VIDEO
    with pytest.raises(ValueError, match="'video'"):
        Attachment("text", b"", "notes.txt")


def mp4_bytes(n: int, seed: int) -> bytes:
    """A tiny MP4 of `n` random 24x16 frames (as tests/test_video.py writes them)."""
    import numpy as np

    av = pytest.importorskip("av")  # the video extra
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 24, 16, "yuv420p"
        for frame in np.random.default_rng(seed).integers(0, 256, size=(n, 16, 24, 3), dtype=np.uint8):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return buffer.getvalue()


def test_a_video_goes_with_the_question(worker, media_dir, tmp_path, monkeypatch):
    data = mp4_bytes(3, seed=0)
    (tmp_path / "clip.mp4").write_bytes(data)
    film = Attachment(VIDEO, str(tmp_path / "clip.mp4"), "clip.mp4")
    worker.submit(Select(str(media_dir)))
    with monkeypatch.context() as m:  # PyAV missing: an error naming the attachment and the fix
        m.setitem(sys.modules, "av", None)
        worker.submit(Ask("what happens?", max_tokens=6, num_draft_tokens=2, attachments=(film,)))
        error = collect(worker)[-1]
    assert isinstance(error, Error) and error.job == "Ask" and error.message.startswith("clip.mp4: ")
    assert "pip install 'mlx-gemma-mtp[video]'" in error.message and worker.history == []
    worker.submit(Ask("what happens?", max_tokens=6, num_draft_tokens=2, attachments=(film,)))
    done = collect(worker)[-1]
    video_part = {"type": "video", "video": data}  # the worker read the file: the chat holds its bytes
    assert isinstance(done, Done) and worker.history[0] == user("what happens?", video_part)
    bundle = mlx_gemma_mtp.load(media_dir)
    for part in (video_part, {"type": "video", "video": str(tmp_path / "clip.mp4")}):
        assert done.text == mlx_gemma_mtp.generate(bundle, [user("what happens?", part)], max_tokens=6,
                                                   num_draft_tokens=2)
    other = user("what happens?", {"type": "video", "video": mp4_bytes(3, seed=1)})  # the video matters
    assert mlx_gemma_mtp.generate(bundle, [other], max_tokens=6, num_draft_tokens=2) != done.text
