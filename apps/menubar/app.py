"""macOS menu-bar app (rumps) over mlx_gemma_mtp's public API: ask, watch tokens/s, stop, pick models, stats.

Model work happens on worker.Worker's thread. This class touches the UI only from the main thread: menu
callbacks submit jobs, and a rumps.Timer drains the worker's result queue ten times a second (changing titles
from another thread crashes rumps apps).
"""

from __future__ import annotations

import argparse
import queue
import subprocess
import sys
from pathlib import Path

import rumps

from apps.menubar import models
from apps.menubar.settings import MAX_DRAFT_TOKENS, load_settings, save_settings
from apps.menubar.worker import (
    Ask,
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
    parse_convert_request,
)

GLYPH, BUSY = "◆", "◇"
PREVIEW_CHARS = 48
NO_ANSWER = "Answer: (none yet)"


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
        self.menu = [self.status_item, self.preview_item, None, "Ask…", "Stop", "New Chat", None,
                     self.model_menu, [rumps.MenuItem("Speculative"), speculative],
                     [rumps.MenuItem("Server"), server], "Stats", "Unload", None, "Quit"]
        self.refresh_models()
        self.refresh_speculative()
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
        prompt = self.ask_text("Ask", "Continue the chat (New Chat starts over):", ok="Ask")
        if prompt:
            s = self.settings
            self.worker.submit(Ask(prompt, s.max_tokens, s.temperature, s.draft_request))
            self.generating, self.question, self.answer = True, prompt, ""
            self.title, self.preview_item.title = BUSY, "Answer: …"

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
            self.generating, self.last_stats, self.title = False, msg.stats, GLYPH
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
