"""macOS menu-bar app (rumps) over mlx_gemma_mtp's public API: ask, watch tokens/s, stop, pick models, stats.

Model work happens on worker.Worker's thread. This class touches the UI only from the main thread: menu
callbacks submit jobs, and a rumps.Timer drains the worker's result queue ten times a second (changing titles
from another thread crashes rumps apps). Images, videos and audio clips attached from the Attachments menu (a
file, the clipboard's image, a screenshot) go with the next question.
"""

from __future__ import annotations

import argparse
import io
import queue
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import rumps

from apps.menubar import models
from apps.menubar.settings import MAX_DRAFT_TOKENS, load_settings, save_settings
from apps.menubar.worker import (
    AUDIO,
    AUDIO_EXTENSIONS,
    IMAGE,
    IMAGE_EXTENSIONS,
    VIDEO,
    VIDEO_EXTENSIONS,
    Ask,
    Attachment,
    Chunk,
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

GLYPH, BUSY = "◆", "◇"
PREVIEW_CHARS = 48
NO_ANSWER = "Answer: (none yet)"
# the general pasteboard's types (NSPasteboardTypePNG / TIFF / FileURL)
PASTEBOARD_PNG, PASTEBOARD_TIFF, PASTEBOARD_FILE_URL = "public.png", "public.tiff", "public.file-url"


def copy_to_clipboard(text: str) -> None:
    """The general pasteboard through AppKit when PyObjC is there (it is, with rumps), else `pbcopy`."""
    try:
        from AppKit import NSPasteboard, NSPasteboardTypeString
    except ImportError:
        subprocess.run(["pbcopy"], input=text.encode(), check=True)
        return
    board = NSPasteboard.generalPasteboard()
    board.clearContents()
    board.setString_forType_(text, NSPasteboardTypeString)


# --- attachments: plain functions (tested on Linux); the AppKit calls are in the three at the end ---


def build_ask(prompt: str, settings, attachments: Sequence[Attachment] = ()) -> Ask:
    """The Ask job for `prompt` with the settings' budget, temperature and draft mode, and the attachments."""
    return Ask(prompt, settings.max_tokens, settings.temperature, settings.draft_request, tuple(attachments))


def attachments_title(attachments: Sequence[Attachment]) -> str:
    return f"Attachments ({len(attachments)})" if attachments else "Attachments"


def attachment_label(index: int, attachment: Attachment) -> str:
    """A pending attachment's menu line; numbered, so that two of one name stay two items."""
    return f"{index}. {attachment.name} ({attachment.kind})"


def picker_extensions(kinds: Sequence[str]) -> list[str]:
    """The file types the Attach panel offers for a model taking `kinds`."""
    return [*(IMAGE_EXTENSIONS if IMAGE in kinds else ()), *(VIDEO_EXTENSIONS if VIDEO in kinds else ()),
            *(AUDIO_EXTENSIONS if AUDIO in kinds else ())]


def file_attachments(paths: Sequence[str]) -> list[Attachment]:
    """The chosen files as attachments, image, video or audio by extension (others skipped)."""
    return [Attachment(kind, str(path), Path(path).name) for path in paths if (kind := attachment_kind(path))]


def pasteboard_png(board) -> bytes:
    """The image on `board` (an NSPasteboard: `types()`, `dataForType_`) as PNG bytes; TIFF (what most apps
    copy) is converted with Pillow.

    Raises:
        ValueError: no image on the board, or a copied file (Finder puts its icon there as a TIFF), with what to
            do instead.
    """
    types = {str(t) for t in (board.types() or ())}
    if PASTEBOARD_FILE_URL in types:
        raise ValueError("The clipboard holds a file, not an image: use Attach Files… to attach a file.")
    for kind in (PASTEBOARD_PNG, PASTEBOARD_TIFF):
        data = board.dataForType_(kind) if kind in types else None
        data = b"" if data is None else bytes(data)  # NSData -> bytes
        if data:
            return data if kind == PASTEBOARD_PNG else tiff_to_png(data)
    raise ValueError("The clipboard holds no image: copy one first (⌃⇧⌘4 copies a screenshot), or use Attach "
                     "Screenshot….")


def tiff_to_png(data: bytes) -> bytes:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            out = io.BytesIO()
            png_mode = image.mode in ("1", "L", "LA", "P", "RGB", "RGBA")
            (image if png_mode else image.convert("RGBA")).save(out, format="PNG")  # e.g. a CMYK TIFF
    except (OSError, ValueError) as e:
        raise ValueError(f"The clipboard's image could not be read: {e}") from None
    return out.getvalue()


def take_screenshot(run=subprocess.run) -> bytes | None:
    """macOS's interactive screenshot (drag a region, Space picks a window, Esc cancels) as PNG bytes; None when
    cancelled (no file, or an empty one). Blocks until the user is done."""
    with tempfile.TemporaryDirectory(prefix="mlx-gemma-mtp-") as folder:
        path = Path(folder) / "screenshot.png"
        run(["screencapture", "-i", "-x", str(path)], check=False)
        return path.read_bytes() if path.is_file() and path.stat().st_size else None


def clipboard_png() -> bytes:
    """The general pasteboard's image as PNG bytes (see `pasteboard_png`)."""
    from AppKit import NSPasteboard

    return pasteboard_png(NSPasteboard.generalPasteboard())


def choose_files(extensions: Sequence[str]) -> list[str]:
    """Paths picked in an open panel showing files of these extensions; [] when cancelled."""
    from AppKit import NSApplication, NSOpenPanel

    panel = NSOpenPanel.openPanel()
    panel.setTitle_("Attach to the next question")
    panel.setCanChooseFiles_(True)
    panel.setCanChooseDirectories_(False)
    panel.setAllowsMultipleSelection_(True)
    panel.setAllowedFileTypes_(list(extensions))
    NSApplication.sharedApplication().activateIgnoringOtherApps_(True)  # a menu-bar app's panel comes to the front
    if panel.runModal() != 1:  # NSModalResponseOK
        return []
    return [str(url.path()) for url in panel.URLs()]


class MenuBarApp(rumps.App):
    def __init__(self, settings_path: Path | None = None, worker: Worker | None = None):
        super().__init__("mlx-gemma-mtp", title=GLYPH, quit_button=None)
        self.settings_path = settings_path
        self.settings, self.notice = load_settings(settings_path)
        self.worker = worker or Worker().start()
        self.generating, self.question, self.answer, self.last_stats = False, "", "", None
        self.model_paths: dict[str, str] = {}
        self.status_item = rumps.MenuItem("No model selected")
        self.preview_item = rumps.MenuItem(NO_ANSWER, callback=self.show_answer)
        self.model_menu = rumps.MenuItem("Model")
        self.spec_items = {m: rumps.MenuItem(m, callback=self.set_speculative) for m in ("auto", "on", "off")}
        speculative = [*self.spec_items.values(), None, rumps.MenuItem("Set K…", callback=self.set_k)]
        self.server_url: str | None = None  # set while the local OpenAI-compatible server runs
        self.server_item = rumps.MenuItem(self.server_label(), callback=self.toggle_server)
        server = [self.server_item, rumps.MenuItem("Set Port…", callback=self.set_port)]
        self.attachments: list[Attachment] = []  # pending: they go with the next Ask
        self.sent: tuple[Attachment, ...] = ()  # those of the Ask being answered (pending again if it fails)
        self.numbered: dict[str, int] = {}  # "Screenshot" -> how many were named so far
        self.attach_menu = rumps.MenuItem("Attachments")
        self.menu = [self.status_item, self.preview_item, None, "Ask…", self.attach_menu, "Stop", "New Chat", None,
                     self.model_menu, [rumps.MenuItem("Speculative"), speculative],
                     [rumps.MenuItem("Server"), server], "Stats", "Unload", None, "Quit"]
        self.refresh_models()
        self.refresh_speculative()
        self.refresh_attachments()
        if self.settings.last_model:
            self.worker.submit(Select(self.settings.last_model))  # loads lazily, on the first Ask
            self.status_item.title = f"Model: {Path(self.settings.last_model).name} (not loaded)"
        self.timer = rumps.Timer(self.drain, 0.1)
        self.timer.start()

    # --- helpers ---
    def save(self) -> None:
        try:
            save_settings(self.settings, self.settings_path)
        except OSError as e:
            rumps.alert("mlx-gemma-mtp", f"Could not save the settings: {e}")

    def ask_text(self, title: str, message: str, default: str = "", ok: str = "OK") -> str | None:
        response = rumps.Window(message=message, title=title, default_text=default, ok=ok, cancel="Cancel",
                                dimensions=(420, 80)).run()
        return response.text.strip() if response.clicked == 1 and response.text.strip() else None

    def refresh_models(self) -> None:
        if len(self.model_menu):
            self.model_menu.clear()
        memory = models.total_memory()
        entries = models.find_models(self.settings.models_folder)
        last = self.settings.last_model
        if last and Path(last).is_dir() and all(str(e.path) != last for e in entries):  # added on its own
            entries.insert(0, models.ModelEntry(Path(last).name, Path(last), models.folder_size(Path(last)),
                                                (Path(last) / "drafter").is_dir()))
        self.model_paths = {models.describe(e, memory): str(e.path) for e in entries}
        for label, path in self.model_paths.items():
            item = rumps.MenuItem(label, callback=self.pick_model)
            item.state = int(path == last)
            self.model_menu.add(item)
        if not entries:
            self.model_menu.add(rumps.MenuItem(f"No models in {self.settings.models_folder}"))
        self.model_menu.add(rumps.separator)
        self.model_menu.add(rumps.MenuItem("Add Folder…", callback=self.add_folder))
        self.model_menu.add(rumps.MenuItem("Convert Hub ID…", callback=self.convert_hub_id))

    def refresh_speculative(self) -> None:
        labels = {"auto": "Auto", "on": f"On (K={self.settings.num_draft_tokens})", "off": "Off"}
        for mode, item in self.spec_items.items():
            item.title = labels[mode]
            item.state = int(mode == self.settings.speculative_mode)

    def refresh_attachments(self) -> None:
        menu = self.attach_menu
        menu.title = attachments_title(self.attachments)
        if len(menu):
            menu.clear()
        menu.add(rumps.MenuItem("Attach Files…", callback=self.attach_files))
        menu.add(rumps.MenuItem("Paste Image", callback=self.paste_image))
        menu.add(rumps.MenuItem("Attach Screenshot…", callback=self.attach_screenshot))
        if self.attachments:
            menu.add(rumps.separator)
            for i, attachment in enumerate(self.attachments, 1):
                menu.add(rumps.MenuItem(attachment_label(i, attachment)))  # no callback: a greyed line
        menu.add(rumps.separator)
        menu.add(rumps.MenuItem("Clear Attachments", callback=self.clear_attachments if self.attachments else None))

    def add_attachments(self, attachments: Sequence[Attachment]) -> None:
        self.attachments += attachments
        self.refresh_attachments()

    def takes_images(self) -> bool:
        """Whether the selected model takes images (from its config.json); says so when it does not."""
        if IMAGE in media_kinds(self.settings.last_model):
            return True
        self.notify(f"{Path(self.settings.last_model).name} takes no images, video or audio (a text-only "
                    "conversion: no vision tower).")
        return False

    def numbered_name(self, stem: str) -> str:
        self.numbered[stem] = self.numbered.get(stem, 0) + 1
        return f"{stem} {self.numbered[stem]}"

    def notify(self, message: str) -> None:
        try:
            rumps.notification("mlx-gemma-mtp", "", message)
        except RuntimeError:  # no notification center (run from a terminal, not the .app): an alert instead
            rumps.alert("mlx-gemma-mtp", message)

    def select_model(self, path: str) -> None:
        self.settings.last_model = path
        self.save()
        self.worker.submit(Select(path, preload=True))
        self.refresh_models()

    def show_error(self, message: str, details: str = "") -> None:
        print(details or message, file=sys.stderr)
        if rumps.alert("mlx-gemma-mtp", message, ok="OK", other="Copy Details" if details else None) == -1:
            copy_to_clipboard(details)

    # --- menu callbacks ---
    @rumps.clicked("Ask…")
    def ask(self, _sender=None) -> None:
        if self.generating or not self.settings.last_model:
            rumps.alert("mlx-gemma-mtp", "Still answering: Stop it first." if self.generating
                        else "Pick a model first (Model ▸).")
            return
        names = ", ".join(a.name for a in self.attachments)
        message = "Continue the chat (New Chat starts over):" + (f"\nWith {names}" if names else "")
        prompt = self.ask_text("Ask", message, ok="Ask")
        if prompt:
            self.worker.submit(build_ask(prompt, self.settings, self.attachments))
            self.sent, self.attachments = tuple(self.attachments), []
            self.refresh_attachments()
            self.generating, self.question, self.answer = True, prompt + (f"\n[{names}]" if names else ""), ""
            self.title, self.preview_item.title = BUSY, "Answer: …"

    def attach_files(self, _sender=None) -> None:
        """Images and videos, and audio too when the model takes it, picked in an open panel."""
        if self.takes_images():
            kinds = media_kinds(self.settings.last_model)
            self.add_attachments(file_attachments(choose_files(picker_extensions(kinds))))

    def paste_image(self, _sender=None) -> None:
        if not self.takes_images():
            return
        try:
            png = clipboard_png()
        except ValueError as e:
            return self.notify(str(e))
        self.add_attachments([Attachment(IMAGE, png, self.numbered_name("Pasted image"))])

    def attach_screenshot(self, _sender=None) -> None:
        if self.takes_images() and (png := take_screenshot()) is not None:  # None: the user pressed Esc
            self.add_attachments([Attachment(IMAGE, png, self.numbered_name("Screenshot"))])

    def clear_attachments(self, _sender=None) -> None:
        self.attachments = []
        self.refresh_attachments()

    @rumps.clicked("Stop")
    def stop(self, _sender=None) -> None:
        if self.generating:
            self.worker.cancel.set()
            self.status_item.title = "Stopping…"

    def show_answer(self, _sender=None) -> None:
        window = rumps.Window(message=self.question, title="Answer", default_text=self.answer, ok="Copy",
                              cancel="Close", dimensions=(480, 320))
        window.add_button("Reply…")
        clicked = window.run().clicked
        if clicked == 1:
            copy_to_clipboard(self.answer)
        elif clicked == 2:
            self.ask()

    @rumps.clicked("New Chat")
    def new_chat(self, _sender=None) -> None:
        self.worker.submit(NewChat())
        self.question = self.answer = ""
        self.preview_item.title = NO_ANSWER

    def pick_model(self, sender) -> None:
        self.select_model(self.model_paths[sender.title])

    def add_folder(self, _sender=None) -> None:
        text = self.ask_text("Add Folder", "A converted model folder, or a folder of them:",
                             default=self.settings.models_folder)
        if text is None:
            return
        path = Path(text).expanduser()
        if (path / "config.json").is_file():
            self.select_model(str(path))
        elif path.is_dir():
            self.settings.models_folder = str(path)
            self.save()
            self.refresh_models()
        else:
            self.show_error(f"{path} is not a folder.")

    def convert_hub_id(self, _sender=None) -> None:
        text = self.ask_text("Convert", "Hub id (optionally a drafter id after it, and --quantize):",
                             ok="Convert")
        if text is None:
            return
        try:
            job = parse_convert_request(text, self.settings.models_folder)
        except ValueError as e:
            return self.show_error(str(e))
        self.worker.submit(job)
        self.title = BUSY

    def set_speculative(self, sender) -> None:
        self.settings.speculative_mode = next(m for m, item in self.spec_items.items() if item is sender)
        self.save()
        self.refresh_speculative()

    def set_k(self, _sender=None) -> None:
        text = self.ask_text("Draft Length", f"Draft tokens per round for 'On' (1-{MAX_DRAFT_TOKENS}):",
                             default=str(self.settings.num_draft_tokens))
        if text is None:
            return
        if not text.isdigit() or not 1 <= int(text) <= MAX_DRAFT_TOKENS:
            return self.show_error(f"{text!r}: enter a whole number from 1 to {MAX_DRAFT_TOKENS}.")
        self.settings.num_draft_tokens, self.settings.speculative_mode = int(text), "on"
        self.save()
        self.refresh_speculative()

    def server_label(self) -> str:
        if self.server_url:
            return f"Stop Server ({self.server_url})"
        return f"Start Server (127.0.0.1:{self.settings.server_port})"

    def toggle_server(self, _sender=None) -> None:
        """The selected model, served over the OpenAI-compatible API while the app runs (see `mlx-gemma-mtp
        serve`); its requests and the menu's questions take turns."""
        self.worker.submit(StopServer() if self.server_url else StartServer(self.settings.server_port))

    def set_port(self, _sender=None) -> None:
        text = self.ask_text("Server Port", "Port for the local server (1-65535):",
                             default=str(self.settings.server_port))
        if text is None:
            return
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            return self.show_error(f"{text!r}: enter a port number from 1 to 65535.")
        self.settings.server_port = int(text)
        self.save()
        self.server_item.title = self.server_label()

    @rumps.clicked("Stats")
    def stats(self, _sender=None) -> None:
        rumps.alert("Last run", self.last_stats.summary() if self.last_stats else "No run yet.")

    @rumps.clicked("Unload")
    def unload(self, _sender=None) -> None:
        self.worker.submit(Unload())

    @rumps.clicked("Quit")
    def quit(self, _sender=None) -> None:
        self.timer.stop()
        self.worker.stop()
        rumps.quit_application()

    # --- the result queue, drained on the main thread ---
    def drain(self, _timer=None) -> None:
        if self.notice:
            notice, self.notice = self.notice, None
            self.show_error(notice)
        while True:
            try:
                self.handle(self.worker.results.get_nowait())
            except queue.Empty:
                return

    def handle(self, msg) -> None:
        if isinstance(msg, Chunk):
            self.answer += msg.text
            if msg.generation_tokens > 1:  # the rate is measured from the first token on
                self.title = f"{GLYPH} {msg.generation_tps:.1f} tok/s"
            self.preview_item.title = "Answer: …" + " ".join(self.answer.split())[-PREVIEW_CHARS:]
        elif isinstance(msg, Done):
            self.generating, self.last_stats, self.title, self.sent = False, msg.stats, GLYPH, ()
            self.status_item.title = msg.stats.headline()
            if not msg.cancelled:
                self.show_answer()
        elif isinstance(msg, Progress):
            self.status_item.title, self.title = msg.text, BUSY
        elif isinstance(msg, Loaded):
            drafter = "with MTP drafter" if msg.has_drafter else "no drafter"
            self.status_item.title = f"Model: {Path(msg.path).name} ({drafter}, {msg.seconds:.1f} s)"
            self.title = BUSY if self.generating else GLYPH
        elif isinstance(msg, Unloaded):
            self.status_item.title, self.title = "Model unloaded", GLYPH
        elif isinstance(msg, (ServerStarted, ServerStopped)):
            self.server_url = msg.url if isinstance(msg, ServerStarted) else None
            self.server_item.title = self.server_label()
            self.status_item.title = f"Serving at {self.server_url}" if self.server_url else "Server stopped"
            self.title = BUSY if self.generating else GLYPH
        elif isinstance(msg, Converted):
            self.title, self.status_item.title = GLYPH, f"Converted to {msg.path}"
            self.refresh_models()
        elif isinstance(msg, Error):
            self.generating = self.generating and msg.job != "Ask"
            if msg.job == "Ask" and self.sent:  # the question was not added to the chat: attach them again
                self.attachments, self.sent = [*self.sent, *self.attachments], ()
                self.refresh_attachments()
            self.title = BUSY if self.generating else GLYPH
            self.status_item.title = "Error (see the alert)"
            self.show_error(msg.message, msg.details)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m apps.menubar", description=__doc__.splitlines()[0])
    parser.add_argument("--settings_path", type=Path, default=None, help="settings JSON (default: per user)")
    args = parser.parse_args(argv)
    from AppKit import NSApplication, NSApplicationActivationPolicyAccessory  # PyObjC comes with rumps

    # no Dock icon when run from a terminal too (the py2app bundle says so with LSUIElement)
    NSApplication.sharedApplication().setActivationPolicy_(NSApplicationActivationPolicyAccessory)
    MenuBarApp(args.settings_path).run()
