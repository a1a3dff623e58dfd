"""The menu-bar app's worker: one background thread owns the model; jobs go in, small messages come out.

No rumps or AppKit here, so all of it runs (and is tested) on Linux. The UI thread puts jobs on `jobs` with
`submit`, drains `results` on a timer, and stops a generation by setting `cancel`: the worker checks it after
every streamed response and then closes the generator, so no further draft/verify round runs. Loading,
generating and freeing all happen on this one thread (MLX streams are per thread). Any failure comes back as
an `Error` message with its traceback; the thread then serves the next job.
"""

from __future__ import annotations

import copy
import gc
import json
import queue
import re
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

import mlx_gemma_mtp as mtp

# --- jobs (UI -> worker) ---


@dataclass(frozen=True)
class Select:
    """Use the model in `path` from now on (a new chat); it loads now if `preload`, else on the next Ask."""

    path: str
    preload: bool = False


IMAGE, VIDEO, AUDIO = "image", "video", "audio"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "gif", "webp", "bmp", "tif", "tiff")  # what Pillow reads
VIDEO_EXTENSIONS = ("mp4", "m4v", "mov", "webm", "mkv", "avi")  # what PyAV decodes (a GIF is an image)
AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "opus", "mp3", "aif", "aiff")  # what libsndfile decodes


@dataclass(frozen=True)
class Attachment:
    """An image, video or audio clip that goes with a question: `source` is a file's path or the bytes of a
    file (e.g. a pasted PNG); `name` is how the menu and error messages call it."""

    kind: str  # IMAGE, VIDEO or AUDIO
    source: str | bytes
    name: str

    def __post_init__(self):
        if self.kind not in (IMAGE, VIDEO, AUDIO):
            raise ValueError(f"an attachment is an {IMAGE!r}, a {VIDEO!r} or an {AUDIO!r}, not {self.kind!r}")

    def part(self) -> dict:
        """The chat content part, holding the file's bytes: the chat keeps what was sent even if the file changes
        or goes away later (and the prompt cache, keyed on the content, is reused on later turns)."""
        data = self.source
        if isinstance(data, str):
            try:
                data = Path(data).expanduser().read_bytes()
            except OSError as e:
                raise ValueError(f"{self.name}: could not read {data}: {e.strerror or e}") from None
        return {"type": self.kind, self.kind: data}


def attachment_kind(path: str | Path) -> str | None:
    """IMAGE, VIDEO or AUDIO by the file's extension; None for anything else."""
    ext = Path(path).suffix.lower().lstrip(".")
    kinds = ((IMAGE, IMAGE_EXTENSIONS), (VIDEO, VIDEO_EXTENSIONS), (AUDIO, AUDIO_EXTENSIONS))
    return next((kind for kind, extensions in kinds if ext in extensions), None)


def media_kinds(model_path: str | Path | None) -> tuple[str, ...]:
    """What the model in `model_path` takes besides text, from its config.json (as the loader decides): (),
    (IMAGE, VIDEO) or (IMAGE, VIDEO, AUDIO): the vision tower reads a video's frames, so video goes with images.
    Without a model or a readable config: all three (the Ask's error will tell)."""
    if model_path is None:
        return IMAGE, VIDEO, AUDIO
    try:
        config = json.loads((Path(model_path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return IMAGE, VIDEO, AUDIO
    if not isinstance(config, dict) or not isinstance(config.get("vision_config"), dict):
        return ()
    return (IMAGE, VIDEO, AUDIO) if isinstance(config.get("audio_config"), dict) else (IMAGE, VIDEO)


@dataclass(frozen=True)
class Ask:
    """One chat turn: the whole conversation so far plus `prompt` goes to the model, with `attachments` (images,
    videos, audio) before the text, in their order."""

    prompt: str
    max_tokens: int = 512
    temperature: float = 0.0
    num_draft_tokens: int | str | None = "auto"  # as stream_generate takes it
    attachments: tuple[Attachment, ...] = ()


@dataclass(frozen=True)
class NewChat:
    pass


@dataclass(frozen=True)
class Unload:
    pass


@dataclass(frozen=True)
class Convert:
    """Convert an HF checkpoint (hub id or folder), with an optional drafter, into `out_dir`."""

    source: str
    out_dir: str
    draft: str | None = None
    quantize: bool = False


@dataclass(frozen=True)
class StartServer:
    """Serve the selected model over the OpenAI-compatible HTTP API on 127.0.0.1:`port` (0 = any free port)."""

    port: int = 8080


@dataclass(frozen=True)
class StopServer:
    pass


@dataclass(frozen=True)
class Shutdown:
    pass


# --- messages (worker -> UI) ---


@dataclass(frozen=True)
class Progress:
    text: str


@dataclass(frozen=True)
class Loaded:
    path: str
    has_drafter: bool
    seconds: float


@dataclass(frozen=True)
class Unloaded:
    pass


@dataclass(frozen=True)
class ServerStarted:
    url: str  # e.g. http://127.0.0.1:8080/v1


@dataclass(frozen=True)
class ServerStopped:
    pass


@dataclass(frozen=True)
class Chunk:
    text: str  # new text since the previous chunk (may be empty while the detokenizer waits)
    generation_tokens: int
    generation_tps: float


@dataclass(frozen=True)
class RunStats:
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0  # GB
    draft: mtp.DraftStats | None = None  # a snapshot; None when decoding was plain
    cached_tokens: int = 0  # prompt tokens taken from the chat's prompt cache (not prefilled again)

    def headline(self) -> str:
        return f"{self.finish_reason}: {self.generation_tokens} tokens, {self.generation_tps:.1f} tok/s"

    def summary(self) -> str:
        lines = [self.headline(),
                 f"Prompt: {self.prompt_tokens} tokens at {self.prompt_tps:.1f} tok/s"
                 + (f" ({self.cached_tokens} reused from the chat's cache)" if self.cached_tokens else ""),
                 f"Peak memory: {self.peak_memory:.2f} GB"]
        if self.draft is None:
            return "\n".join(lines + ["Speculative decoding: off"])
        d = self.draft
        per_position = "  ".join(f"{i + 1}: {a:.0%}" for i, a in enumerate(d.acceptance_per_position)) or "-"
        return "\n".join(lines + [f"MTP rounds: {d.rounds} drafting + {d.plain_rounds} plain, drafted {d.drafted}, "
                                  + f"accepted {d.accepted} ({d.acceptance_rate:.0%})",
                                  f"Mean accepted length: {d.mean_accepted_length:.2f} drafts per drafting round",
                                  f"Acceptance per draft position: {per_position}"])


@dataclass(frozen=True)
class Done:
    text: str  # the whole answer
    stats: RunStats

    @property
    def cancelled(self) -> bool:
        return self.stats.finish_reason == "cancelled"


@dataclass(frozen=True)
class Converted:
    path: str


@dataclass(frozen=True)
class Error:
    message: str  # one readable line for an alert
    details: str  # the traceback text
    job: str = ""  # the failed job's class name ("Ask", "Select", ...)


def _stats(r: mtp.GenerationResponse | None, finish_reason: str, cached_tokens: int = 0) -> RunStats:
    if r is None:
        return RunStats(finish_reason)
    return RunStats(finish_reason, r.prompt_tokens, r.prompt_tps, r.generation_tokens, r.generation_tps,
                    r.peak_memory, copy.deepcopy(r.draft), cached_tokens)


def _name_parts(message: str, turn: int, attachments: tuple[Attachment, ...]) -> str:
    """The library names a bad part "messages[3].content[1]"; this turn's parts are called by their names."""

    def name(m: re.Match) -> str:
        j = int(m.group(1))
        return attachments[j].name if j < len(attachments) else "your question"

    return re.sub(rf"messages\[{turn}\]\.content\[(\d+)\]", name, message)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def parse_convert_request(text: str, models_folder: str | Path) -> Convert:
    """Parse "owner/model [owner/drafter] [--quantize]" (hub ids or local folders) into a Convert job."""
    words = text.split()
    quantize = "--quantize" in words
    names = [w for w in words if w != "--quantize"]
    if not 1 <= len(names) <= 2:
        raise ValueError(f"{text!r}: expected 'owner/model', optionally a drafter id after it and --quantize")
    for name in names:
        if not (HUB_ID.match(name) or Path(name).expanduser().is_dir()):
            raise ValueError(f"{name!r} is neither a hub id of the form 'owner/name' nor an existing folder")
    stem = Path(names[0].rstrip("/")).name + ("-mlx-q" if quantize else "-mlx")
    draft = names[1] if len(names) > 1 else None
    return Convert(names[0], str(Path(models_folder).expanduser() / stem), draft, quantize)


class Worker:
    """Owns the model on one daemon thread. Use `submit(job)`, read `results`, set `cancel` to stop."""

    def __init__(self, results: queue.Queue | None = None):
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = results if results is not None else queue.Queue()
        self.cancel = threading.Event()
        self.bundle: mtp.Bundle | None = None
        self.path: str | None = None
        self.history: list[dict] = []  # chat messages, re-sent each turn
        self.prompt_cache = mtp.PromptCache()  # this chat's K/V: a Reply prefills only the new turn
        self.server = None  # the local HTTP server over the loaded bundle, while it runs
        self._server_thread: threading.Thread | None = None
        self._thread = threading.Thread(target=self._run, name="mlx-gemma-mtp-worker", daemon=True)

    def start(self) -> Worker:
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job) -> None:
        if isinstance(job, Ask):
            self.cancel.clear()  # a Stop pressed after this point cancels this job
        self.jobs.put(job)

    def stop(self, timeout: float = 2.0) -> None:
        self.cancel.set()
        self.jobs.put(Shutdown())
        self._thread.join(timeout)

    def _run(self) -> None:
        handlers = {Select: self._select, Ask: self._ask, NewChat: self._new_chat, Unload: self._unload,
                    Convert: self._convert, StartServer: self._start_server, StopServer: self._stop_server}
        while not isinstance(job := self.jobs.get(), Shutdown):
            try:
                handlers[type(job)](job)
            except Exception as e:  # noqa: BLE001 -- reported to the user; the thread lives on
                message = str(e) or type(e).__name__
                self.results.put(Error(message, traceback.format_exc(), type(job).__name__))
        self._stop_server()
        self.bundle = None  # the process or this worker is going away: no collection needed

    def _free(self) -> None:
        self._stop_server()  # it serves the model being freed
        if self.bundle is not None:
            self.bundle = None
            self.prompt_cache.reset()  # it holds K/V of the model being freed
            gc.collect()  # the model's arrays go now, not at some later collection
        mx.clear_cache()

    def _ensure_loaded(self) -> mtp.Bundle:
        if self.bundle is None:
            if self.path is None:
                raise ValueError("No model selected: pick one in Model ▸ (or Add Folder…).")
            self.results.put(Progress(f"Loading {Path(self.path).name}…"))
            tic = time.perf_counter()
            try:
                self.bundle = mtp.load(self.path)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise RuntimeError(f"Could not load {Path(self.path).name}: {e}") from e
            self.results.put(Loaded(self.path, self.bundle.drafter is not None, time.perf_counter() - tic))
        return self.bundle

    def _select(self, job: Select) -> None:
        path = str(Path(job.path).expanduser())
        if path != self.path:
            self._free()
            self.path, self.history = path, []
            self.prompt_cache.reset()
        if job.preload:
            self._ensure_loaded()

    def _new_chat(self, _job: NewChat) -> None:
        self.history = []
        self.prompt_cache.reset()

    def _unload(self, _job: Unload) -> None:
        self._free()
        self.results.put(Unloaded())

    def _sampler(self, bundle: mtp.Bundle, temperature: float) -> mtp.SamplerConfig:
        if temperature == 0:
            return mtp.SamplerConfig()
        gen = bundle.generation  # the checkpoint authors' top-p / top-k go with sampling
        return mtp.SamplerConfig(temperature=temperature, top_p=gen.top_p or 1.0, top_k=gen.top_k or 0)

    def _ask(self, job: Ask) -> None:
        bundle = self._ensure_loaded()
        k = job.num_draft_tokens
        if isinstance(k, int) and k > 0 and bundle.drafter is None:
            raise ValueError(f"{self.path} has no drafter/ folder: choose Speculative ▸ Auto or Off.")
        # a failed attachment raises here or on the stream's first response: the chat is left as it was
        messages = self.history + [{"role": "user", "content": self._content(bundle, job)}]
        pieces, last, cached = [], None, 0
        cancelled = self.cancel.is_set()  # Stop may have been pressed while the model loaded
        if not cancelled:
            stream = mtp.stream_generate(bundle, messages, max_tokens=job.max_tokens,
                                         sampler=self._sampler(bundle, job.temperature), num_draft_tokens=k,
                                         prompt_cache=self.prompt_cache)
            try:
                for r in stream:
                    if cancelled := self.cancel.is_set():
                        break
                    last, cached = r, self.prompt_cache.reused
                    pieces.append(r.text)
                    self.results.put(Chunk(r.text, r.generation_tokens, r.generation_tps))
            except ValueError as e:  # an undecodable attachment (or no PyAV), named as the menu names it
                if not job.attachments:
                    raise
                raise ValueError(_name_parts(str(e), len(messages) - 1, job.attachments)) from e
            finally:
                stream.close()  # no further draft/verify round runs
        finish = "cancelled" if cancelled or last is None else last.finish_reason
        answer = "".join(pieces)
        if finish != "cancelled" or answer:  # a stopped answer stays in the chat as far as it was shown
            self.history = messages + [{"role": "assistant", "content": answer}]
        self.results.put(Done(answer, _stats(last, finish, cached)))

    def _content(self, bundle: mtp.Bundle, job: Ask) -> str | list[dict]:
        """The user message's content: the prompt, or the attachments' parts (files read now) then the text."""
        if not job.attachments:
            return job.prompt
        name = Path(self.path).name
        if bundle.media is None:
            raise ValueError(f"{name} takes no images, video or audio (a text-only conversion: no vision tower). "
                             "Clear Attachments, or pick a model converted with its vision tower.")
        if not bundle.media.takes_audio and (clips := [a.name for a in job.attachments if a.kind == AUDIO]):
            raise ValueError(f"{name} takes no audio (only Gemma 4 E2B and E4B have an audio tower): "
                             f"{', '.join(clips)}. Clear Attachments, or attach images and videos only.")
        return [*(a.part() for a in job.attachments), {"type": "text", "text": job.prompt}]

    def _start_server(self, job: StartServer) -> None:
        """The server shares the loaded bundle: its requests and the app's questions take turns (one generation
        at a time per bundle); it keeps its own prompt cache."""
        from mlx_gemma_mtp.server import make_server  # imported only when used

        self._stop_server()
        bundle = self._ensure_loaded()
        try:
            self.server = make_server(bundle, port=job.port, model_name=Path(self.path).name)
        except OSError as e:
            raise RuntimeError(f"Could not start the server on port {job.port}: {e}") from e
        self._server_thread = threading.Thread(target=self.server.serve_forever, name="mlx-gemma-mtp-server")
        self._server_thread.start()
        host, port = self.server.server_address[:2]
        self.results.put(ServerStarted(f"http://{host}:{port}/v1"))

    def _stop_server(self, _job: StopServer | None = None) -> None:
        if self.server is not None:
            self.server.shutdown()  # serve_forever returns
            self.server.server_close()  # open connections end, their threads are joined
            self._server_thread.join()
            self.server = self._server_thread = None
            self.results.put(ServerStopped())

    def _convert(self, job: Convert) -> None:
        from mlx_gemma_mtp.convert import convert  # imported only when used

        what = job.source + (f" with drafter {job.draft}" if job.draft else "")
        self.results.put(Progress(f"Converting {what}…"))
        convert(job.source, job.out_dir, draft_hf_path=job.draft, quantize=job.quantize)
        self.results.put(Converted(job.out_dir))
