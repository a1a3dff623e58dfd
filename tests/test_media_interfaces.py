"""An image and an audio clip through every interface: the OpenAI server (the official client, streaming or not,
with its prompt cache and its 400s), `mlx-gemma-mtp generate --image/--audio` and the chat REPL's /image and
/audio. Each answer equals `mlx_gemma_mtp.generate` on the same bundle and messages (greedy)."""

from __future__ import annotations

import base64

import live_server
import pytest
from test_chat import Out, chat_args, scripted
from test_multimodal import image_bytes, wav_bytes, write_media_pair

import mlx_gemma_mtp
from mlx_gemma_mtp.cli import main
from mlx_gemma_mtp.cli.chat import run_chat
from mlx_gemma_mtp.decode import encode_prompt

openai = pytest.importorskip("openai")

K, MAX_TOKENS = 2, 8
QUESTION = "what is this?"
SIZE = (24, 16)  # every test image has this size: two of them expand to the same placeholder ids


# ------------------------------------------------------------------------------------------------------------
# Checkpoints, media files and the live servers (module-scoped: built once)
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    """kind -> the folder of a tiny multimodal pair: "e2b" (vision + audio), "31b" (vision only)."""
    made = {}

    def get(kind: str):
        if kind not in made:
            path = tmp_path_factory.mktemp(f"media-if-{kind}")
            write_media_pair(path, kind)
            made[kind] = path
        return made[kind]

    return get


@pytest.fixture(scope="module")
def e2b(media_dir):
    return mlx_gemma_mtp.load(media_dir("e2b"))  # as the CLI loads it (dtype as stored)


@pytest.fixture(scope="module")
def vision_only(media_dir):
    return mlx_gemma_mtp.load(media_dir("31b"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Media files on disk: PNGs (one per seed, all SIZE), a WAV, and a text file named .png."""
    folder = tmp_path_factory.mktemp("media-files")
    out = {"wav": folder / "clip.wav", "fake_png": folder / "notes.png"}
    out["wav"].write_bytes(wav_bytes(0.5, 0))
    out["fake_png"].write_text("these are notes, not pixels\n")
    for seed in range(1, 6):
        out[f"png{seed}"] = folder / f"picture{seed}.png"
        out[f"png{seed}"].write_bytes(image_bytes(*SIZE, seed))
    return out


@pytest.fixture(scope="module")
def server(e2b):
    yield from live_server.serving(e2b, model_name="tiny", num_draft_tokens=K)


@pytest.fixture(scope="module")
def client(server):
    yield from live_server.client_of(server)


@pytest.fixture(scope="module")
def local_client(e2b):
    """A second server over the same bundle, started with allow_local_media=True."""
    served = live_server.start(e2b, model_name="tiny", num_draft_tokens=K, allow_local_media=True)
    with live_server.client(served[0]) as c:
        yield c
    live_server.stop(*served)


@pytest.fixture(scope="module")
def vision_client(vision_only):
    served = live_server.start(vision_only, model_name="tiny", num_draft_tokens=K)
    with live_server.client(served[0]) as c:
        yield c
    live_server.stop(*served)


@pytest.fixture(scope="module")
def text_only(pair_dir):
    return mlx_gemma_mtp.load(pair_dir("e2b")[0])


@pytest.fixture(scope="module")
def text_client(text_only):
    served = live_server.start(text_only, model_name="tiny", num_draft_tokens=K)
    with live_server.client(served[0]) as c:
        yield c
    live_server.stop(*served)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_part(seed: int) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image_bytes(*SIZE, seed))}}


def audio_part(data: bytes | None = None) -> dict:
    data = wav_bytes(0.5, 0) if data is None else data
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}


def user(*parts, text: str = QUESTION) -> dict:
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def fresh(bundle, messages, max_tokens: int = MAX_TOKENS) -> str:
    return mlx_gemma_mtp.generate(bundle, messages, max_tokens=max_tokens, num_draft_tokens=K)


def ask(client, messages, max_tokens: int = MAX_TOKENS, **kwargs):
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0,
                                          **kwargs)


# ------------------------------------------------------------------------------------------------------------
# 1. The server, through the official client
# ------------------------------------------------------------------------------------------------------------

def test_server_image_and_audio_equal_generate(client, e2b):
    messages = [user(image_part(3), audio_part())]
    encoded = encode_prompt(e2b, messages)
    assert [s.kind for s in encoded.spans] == ["image", "audio"]
    want = fresh(e2b, messages)
    assert want != fresh(e2b, [user(audio_part())]), "the image must matter for this test to mean anything"

    r = ask(client, messages)
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(encoded.ids)  # the expanded prompt: placeholders and soft tokens

    chunks = list(ask(client, messages, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.prompt_tokens == len(encoded.ids)


def test_server_next_turn_reuses_the_media_from_the_prompt_cache(client, e2b):
    first = [user(image_part(4), audio_part())]
    answer = ask(client, first).choices[0].message.content
    assert answer == fresh(e2b, first)
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "and the sound?"}]
    r = ask(client, second)
    assert r.choices[0].message.content == fresh(e2b, second)
    encoded = encode_prompt(e2b, second)
    assert r.usage.prompt_tokens == len(encoded.ids)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert cached > encoded.spans[-1].end  # the image and the clip were not encoded and prefilled again


def test_server_two_images_of_one_size_get_their_own_answers(client, e2b):
    a, b = [user(image_part(1), audio_part())], [user(image_part(2), audio_part())]
    encoded_a, encoded_b = encode_prompt(e2b, a), encode_prompt(e2b, b)
    assert encoded_a.ids == encoded_b.ids  # same placeholders: only the content tells them apart
    want_a, want_b = fresh(e2b, a), fresh(e2b, b)
    assert want_a != want_b, "the images must change the answer for this test to mean anything"
    ra, rb = ask(client, a), ask(client, b)
    assert (ra.choices[0].message.content, rb.choices[0].message.content) == (want_a, want_b)
    assert rb.usage.prompt_tokens_details.cached_tokens <= encoded_b.spans[0].start  # nothing of image 1 reused


def test_server_local_paths_only_when_allowed(client, local_client, e2b, files):
    local = [user({"type": "image_url", "image_url": {"url": str(files["png5"])}}, audio_part())]
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, local)
    assert e.value.status_code == 400 and "--allow-local-media" in e.value.body["message"]
    assert_serves(client, e2b)
    # the same path on a server started with allow_local_media=True: the answer of the file's bytes
    want = fresh(e2b, [user(image_part(5), audio_part())])
    assert fresh(e2b, local) == want
    assert ask(local_client, local).choices[0].message.content == want


GOOD = [{"role": "user", "content": "Hello world"}]


def assert_serves(client, bundle) -> None:
    """The server still answers a good request, exactly (its model and caches intact)."""
    r = ask(client, GOOD, max_tokens=4)
    assert r.choices[0].message.content == fresh(bundle, GOOD, max_tokens=4)


BAD_PARTS = {
    "web URL": ("e2b", {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "network"),
    "web URL audio": ("e2b", {"type": "audio", "audio": "http://example.com/a.wav"}, "network"),
    "not base64": ("e2b", {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not*base64@@"}},
                   "not valid base64"),
    "not an image": ("e2b", {"type": "image_url", "image_url": {"url": data_url(b"plain text, no pixels")}},
                     "not an image"),
    "not audio": ("e2b", audio_part(b"plain text, no samples"), "not audio"),
    "audio base64": ("e2b", {"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}},
                     "not valid base64"),
    "audio to 31b": ("31b", audio_part(), "takes no audio"),
    "image detail": ("e2b", {"type": "image_url", "image_url": {"url": data_url(image_bytes(*SIZE, 1)),
                                                                "detail": "medium"}}, "must be one of"),
    "image budget": ("e2b", {**image_part(1), "max_soft_tokens": 100}, "max_soft_tokens=100 must be one of"),
    "image to text-only": ("text", image_part(1), "takes no images or audio"),
}


@pytest.mark.parametrize("name", list(BAD_PARTS))
def test_server_bad_media_is_a_400_and_the_server_goes_on(request, name):
    kind, part, message = BAD_PARTS[name]
    client, bundle = {"e2b": ("client", "e2b"), "31b": ("vision_client", "vision_only"),
                      "text": ("text_client", "text_only")}[kind]
    client, bundle = request.getfixturevalue(client), request.getfixturevalue(bundle)
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, [user(part)])
    assert e.value.status_code == 400 and message in e.value.body["message"], e.value.body
    if kind != "text":
        assert "messages[0].content[0]" in e.value.body["message"]  # the part is named
    assert_serves(client, bundle)


def test_vision_only_server_answers_an_image(vision_client, vision_only):
    messages = [user(image_part(2))]
    assert ask(vision_client, messages).choices[0].message.content == fresh(vision_only, messages)


# ------------------------------------------------------------------------------------------------------------
# 2. The command line: generate --image/--audio
# ------------------------------------------------------------------------------------------------------------

def cli_messages(png, wav, prompt: str = QUESTION) -> list[dict]:
    """What `generate --image PNG --audio WAV --prompt PROMPT` asks: images, then clips, then the text."""
    return [{"role": "user", "content": [{"type": "image", "image": str(png)}, {"type": "audio", "audio": str(wav)},
                                         {"type": "text", "text": prompt}]}]


def cli(model, *flags: str) -> int:
    return main(["generate", "--model", str(model), "--prompt", QUESTION, "--max-tokens", str(MAX_TOKENS),
                 "--num-draft-tokens", str(K), *flags])


def test_cli_generate_with_an_image_and_audio_equals_generate(media_dir, e2b, files, capsys):
    assert cli(media_dir("e2b"), "--image", str(files["png3"]), "--audio", str(files["wav"])) == 0
    out, err = capsys.readouterr()
    want = fresh(e2b, cli_messages(files["png3"], files["wav"]))
    assert out == want + "\n"
    assert f"prompt: {len(encode_prompt(e2b, cli_messages(files['png3'], files['wav'])))} tokens" in err


def test_cli_missing_media_file_fails_before_loading(media_dir, files, monkeypatch):
    import mlx_gemma_mtp.cli.generate as generate_module

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the media files were checked")

    monkeypatch.setattr(generate_module, "load_model", no_load)
    for flags in (["--image", str(files["png1"].parent / "missing.png")],
                  ["--image", str(files["png1"]), "--audio", str(files["png1"].parent / "missing.wav")]):
        with pytest.raises(SystemExit) as e:
            cli(media_dir("e2b"), *flags)
        assert "no such file" in str(e.value.code) and "missing." in str(e.value.code)


def test_cli_media_need_the_chat_template(media_dir, files):
    with pytest.raises(SystemExit) as e:
        cli(media_dir("e2b"), "--image", str(files["png1"]), "--no-chat-template")
    assert "--no-chat-template" in str(e.value.code) and "chat template" in str(e.value.code)


def test_cli_audio_to_a_vision_only_checkpoint_is_an_error(media_dir, files, capsys):
    assert cli(media_dir("31b"), "--audio", str(files["wav"])) == 1
    assert "takes no audio" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# 3. The chat REPL: /image and /audio
# ------------------------------------------------------------------------------------------------------------

def repl(bundle, lines: list[str]):
    out = Out()
    chat = run_chat(bundle, chat_args("--max-tokens", str(MAX_TOKENS), "--num-draft-tokens", str(K)),
                    scripted(lines, out), out)
    return chat, out.getvalue()


def test_chat_image_and_audio_answer_exactly_and_stay_cached(e2b, files):
    chat, out = repl(e2b, [f"/image {files['png3']}", f"/audio {files['wav']}", QUESTION, "and the sound?"])
    assert "attached picture3.png (image)" in out and "attached clip.wav (audio)" in out
    messages = chat.messages
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert messages[0]["content"] == cli_messages(files["png3"], files["wav"])[0]["content"]
    assert messages[2]["content"] == "and the sound?"  # attachments go with one message only
    assert messages[1]["content"] == fresh(e2b, messages[:1])
    assert messages[3]["content"] == fresh(e2b, messages[:3])
    spans = encode_prompt(e2b, messages[:3]).spans
    assert [s.kind for s in spans] == ["image", "audio"]  # the history keeps them
    assert chat.cache.reused > spans[-1].end  # the second turn prefilled neither again


def test_chat_missing_file_attaches_nothing(e2b, files):
    chat, out = repl(e2b, [f"/image {files['png1'].parent / 'missing.png'}", "/image", QUESTION])
    assert "error: /image needs the path of a file" in out and "missing.png" in out and "none given" in out
    assert chat.messages[0] == {"role": "user", "content": QUESTION}  # plain text: nothing attached
    assert chat.messages[1]["content"] == fresh(e2b, chat.messages[:1])


def test_chat_audio_on_a_vision_only_checkpoint(vision_only, files):
    chat, out = repl(vision_only, [f"/audio {files['wav']}", f"/image {files['png2']}", QUESTION])
    assert "takes no audio" in out
    assert [p["type"] for p in chat.messages[0]["content"]] == ["image", "text"]  # the image alone went
    assert chat.messages[1]["content"] == fresh(vision_only, chat.messages[:1])


def test_chat_bad_attachment_is_an_error_and_the_conversation_goes_on(e2b, files):
    chat, out = repl(e2b, [f"/image {files['fake_png']}", QUESTION, "Hello world"])
    assert "not an image" in out and "(attachments dropped)" in out
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]  # the failed message was dropped
    assert chat.messages[0] == {"role": "user", "content": "Hello world"}
    assert chat.messages[1]["content"] == fresh(e2b, chat.messages[:1])
    assert not chat.attached


def test_chat_on_a_text_only_checkpoint_refuses_attachments(text_only, files):
    chat, out = repl(text_only, [f"/image {files['png1']}", "Hello world"])
    assert "takes no images or audio" in out
    assert chat.messages[0] == {"role": "user", "content": "Hello world"}
    assert chat.messages[1]["content"] == fresh(text_only, chat.messages[:1])


def test_stats_line_counts_the_expanded_prompt(e2b, files):
    _, out = repl(e2b, [f"/image {files['png4']}", QUESTION])
    prompt = [{"role": "user", "content": [{"type": "image", "image": str(files["png4"])},
                                           {"type": "text", "text": QUESTION}]}]
    assert f"reused 0 of {len(encode_prompt(e2b, prompt))} tokens" in out

