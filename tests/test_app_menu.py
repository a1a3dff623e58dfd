"""The menu-bar app's menu and callbacks, through the real app class and worker with a tiny real bundle.

rumps cannot be imported on Linux (it needs AppKit), so a minimal stand-in module records titles, menu items,
windows and alerts; everything else (worker thread, settings file, model listing) is the real code.
"""

from __future__ import annotations

import importlib
import io
import json
import socket
import sys
import time
import types
from collections import OrderedDict
from pathlib import Path

import pytest
from test_multimodal import image_bytes, wav_bytes, write_media_pair

from apps.menubar import models
from apps.menubar.settings import Settings, load_settings, save_settings
from apps.menubar.worker import AUDIO, IMAGE, VIDEO, Ask, Attachment, media_kinds

TIMEOUT = 60


def make_fake_rumps() -> types.ModuleType:
    rumps = types.ModuleType("rumps")
    rumps.separator = object()
    rumps.alerts, rumps.notifications, rumps.windows, rumps.clicks = [], [], [], {}
    rumps.alert_answers, rumps.window_answers = [], []  # scripted button presses, consumed in order
    rumps.quit_calls = 0

    class MenuItem:
        def __init__(self, title, callback=None, key=None, icon=None, dimensions=None, template=None):
            self.title, self.callback, self.state, self._items = str(title), callback, 0, OrderedDict()
            self._separators = 0

        def set_callback(self, callback, key=None):
            self.callback = callback

        def add(self, item):
            if item is None or item is rumps.separator:
                self._separators += 1
                self._items[f"separator_{self._separators}"] = None
                return
            item = item if isinstance(item, MenuItem) else MenuItem(item)
            self._items.setdefault(item.title, item)

        def update(self, iterable):
            for element in iterable:
                if isinstance(element, (list, tuple)):
                    parent, children = element
                    parent = parent if isinstance(parent, MenuItem) else MenuItem(parent)
                    self.add(parent)
                    parent.update(children)
                else:
                    self.add(element)

        def clear(self):
            self._items.clear()

        def __getitem__(self, key):
            return self._items[key]

        def __contains__(self, key):
            return key in self._items

        def __len__(self):
            return len(self._items)

        def __iter__(self):
            return iter(self._items)

        def values(self):
            return list(self._items.values())

    class App:
        def __init__(self, name, title=None, icon=None, template=None, menu=None, quit_button="Quit"):
            self.name, self.title, self._menu = name, title, MenuItem(name)
            if menu is not None:
                self.menu = menu

        @property
        def menu(self):
            return self._menu

        @menu.setter
        def menu(self, iterable):
            self._menu.update(iterable)

        def run(self, **options):
            raise AssertionError("the test never runs the event loop")

    class Timer:
        def __init__(self, callback, interval):
            self.callback, self.interval, self.running = callback, interval, False

        def start(self):
            self.running = True

        def stop(self):
            self.running = False

    class Response:
        def __init__(self, clicked, text):
            self.clicked, self.text = clicked, text

    class Window:
        def __init__(self, message="", title="", default_text="", ok=None, cancel=None, dimensions=(320, 160),
                     secure=False):
            self.message, self.title, self.default_text, self.buttons = message, title, default_text, []
            rumps.windows.append(self)

        def add_button(self, name):
            self.buttons.append(name)

        def run(self):
            clicked, text = rumps.window_answers.pop(0) if rumps.window_answers else (0, "")
            return Response(clicked, self.default_text if text is None else text)

    def alert(title=None, message="", ok=None, cancel=None, other=None, icon_path=None):
        rumps.alerts.append((title, message))
        return rumps.alert_answers.pop(0) if rumps.alert_answers else 1

    def notification(title, subtitle, message, data=None, sound=True, **kwargs):
        rumps.notifications.append((title, subtitle, message))

    def clicked(*path, **options):
        def decorator(f):
            rumps.clicks[path] = f
            return f

        return decorator

    def quit_application(sender=None):
        rumps.quit_calls += 1

    for obj in (MenuItem, App, Timer, Response, Window, alert, notification, clicked, quit_application):
        setattr(rumps, obj.__name__, obj)
    return rumps


@pytest.fixture
def rumps(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # the default settings folder, if used
    fake = make_fake_rumps()
    monkeypatch.setitem(sys.modules, "rumps", fake)
    monkeypatch.delitem(sys.modules, "apps.menubar.app", raising=False)
    return fake


@pytest.fixture
def models_folder(tmp_path, pair_dir):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "tiny-e2b").symlink_to(pair_dir("e2b", True, "text")[0], target_is_directory=True)
    (folder / "broken").mkdir()
    (folder / "broken" / "config.json").write_text("{not json")
    (folder / "not-a-model").mkdir()
    return folder


@pytest.fixture
def make_app(rumps, models_folder, tmp_path, monkeypatch):
    apps = []
    copied = []

    def make(**settings):
        app_module = importlib.import_module("apps.menubar.app")
        monkeypatch.setattr(app_module, "copy_to_clipboard", copied.append)
        path = tmp_path / "settings.json"
        if not path.exists():
            save_settings(Settings(models_folder=str(models_folder), **settings), path)
        app = app_module.MenuBarApp(settings_path=path)
        app.copied = copied
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.quit()


def pump(app, until, timeout=TIMEOUT):
    """Run the app's timer callback (as the main run loop would) until `until()` holds."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out waiting for the worker"
        app.timer.callback(app.timer)
        time.sleep(0.005)


def label_of(app, name):
    return next(label for label, path in app.model_paths.items() if path.endswith(name))


def test_menu_is_built_with_models_and_modes(make_app, rumps):
    app = make_app()
    assert app.title == "◆" and app.timer.running and app.worker.is_alive()
    top = list(app.menu)
    for title in ("Ask…", "Attachments", "Stop", "New Chat", "Model", "Speculative", "Stats", "Unload", "Quit"):
        assert title in top
    assert top.index("Ask…") < top.index("Model") < top.index("Quit")
    model_menu = list(app.menu["Model"])
    assert "Add Folder…" in model_menu and "Convert Hub ID…" in model_menu
    tiny = label_of(app, "tiny-e2b")
    assert tiny.startswith("tiny-e2b · ") and " · MTP · " in tiny
    assert tiny.endswith(("fits", "tight", "too big", "?"))
    assert any(label.startswith("broken") for label in app.model_paths)
    assert not any("not-a-model" in label for label in app.model_paths)
    speculative = app.menu["Speculative"]
    assert [item.title for item in app.spec_items.values()] == ["Auto", "On (K=3)", "Off"]
    assert [item.state for item in app.spec_items.values()] == [1, 0, 0]
    assert "Set K…" in speculative
    assert {("Ask…",), ("Stop",), ("Stats",), ("Unload",), ("Quit",)} <= set(rumps.clicks)


def test_picking_a_model_loads_it_and_remembers_it(make_app, models_folder, tmp_path):
    app = make_app()
    item = app.menu["Model"][label_of(app, "tiny-e2b")]
    item.callback(item)
    pump(app, lambda: app.status_item.title.startswith("Model: tiny-e2b (with MTP drafter"))
    assert app.worker.bundle is not None
    assert app.menu["Model"][label_of(app, "tiny-e2b")].state == 1
    settings, notice = load_settings(tmp_path / "settings.json")
    assert settings.last_model == str(models_folder / "tiny-e2b") and notice is None
    app.unload()
    pump(app, lambda: app.status_item.title == "Model unloaded")
    assert app.worker.bundle is None


def test_speculative_mode_and_k_are_saved(make_app, rumps, tmp_path):
    app = make_app()
    off = app.spec_items["off"]
    off.callback(off)
    assert [item.state for item in app.spec_items.values()] == [0, 0, 1]
    assert load_settings(tmp_path / "settings.json")[0].speculative_mode == "off"
    rumps.window_answers.append((1, "5"))
    app.set_k()
    assert app.spec_items["on"].title == "On (K=5)" and app.spec_items["on"].state == 1
    saved = load_settings(tmp_path / "settings.json")[0]
    assert (saved.speculative_mode, saved.num_draft_tokens, saved.draft_request) == ("on", 5, 5)
    rumps.window_answers.append((1, "99"))
    app.set_k()
    assert "1 to 16" in rumps.alerts[-1][1] and app.settings.num_draft_tokens == 5


def test_ask_streams_an_answer_and_stats(make_app, rumps, models_folder):
    app = make_app(last_model=str(models_folder / "tiny-e2b"), max_tokens=8, speculative_mode="on",
                   num_draft_tokens=2)
    rumps.window_answers += [(1, "Hello"), (1, None)]  # the question, then "Copy" in the answer window
    titles, handle = [], app.handle
    app.handle = lambda msg: (handle(msg), titles.append(app.title))
    app.ask()
    assert app.generating and app.title == "◇"
    pump(app, lambda: not app.generating)
    assert any(t.startswith("◆ ") and t.endswith(" tok/s") for t in titles)  # live tokens/s while streaming
    answer_window = rumps.windows[-1]
    assert answer_window.title == "Answer" and answer_window.message == "Hello"
    assert answer_window.default_text == app.answer and app.copied == [app.answer]
    assert app.last_stats.draft is not None and app.last_stats.generation_tokens <= 8
    app.stats()
    title, text = rumps.alerts[-1]
    assert title == "Last run" and "Mean accepted length" in text
    assert "Acceptance per draft position: 1:" in text
    assert app.title == "◆"


def test_stop_cancels_mid_stream(make_app, rumps, models_folder):
    # a long budget so that Stop lands mid-stream even on a loaded machine (test_app_worker checks the exact
    # one-round cancel deterministically)
    app = make_app(last_model=str(models_folder / "tiny-e2b"), max_tokens=4000, speculative_mode="off")
    rumps.window_answers.append((1, "Hello"))
    app.ask()
    pump(app, lambda: app.title.endswith("tok/s"))  # streaming has started
    app.stop()
    assert app.status_item.title == "Stopping…"
    pump(app, lambda: not app.generating)
    assert app.last_stats.finish_reason == "cancelled" and app.last_stats.generation_tokens < 4000
    assert app.status_item.title.startswith("cancelled: ")
    assert not any(w.title == "Answer" for w in rumps.windows)  # a stopped answer does not pop up
    rumps.window_answers.append((0, ""))
    app.preview_item.callback(app.preview_item)  # ...but can be opened from the menu
    assert rumps.windows[-1].default_text == app.answer


def test_errors_are_shown(make_app, rumps, models_folder):
    app = make_app()
    app.ask()  # no model yet
    assert rumps.alerts[-1][1] == "Pick a model first (Model ▸)." and not app.generating
    rumps.alert_answers.append(-1)  # "Copy Details"
    item = app.menu["Model"][label_of(app, "broken")]
    item.callback(item)
    pump(app, lambda: app.status_item.title.startswith("Error"))
    assert "broken" in rumps.alerts[-1][1] and "config.json" in rumps.alerts[-1][1]
    assert "Traceback" in app.copied[-1]
    assert app.worker.is_alive() and app.title == "◆"
    rumps.window_answers.append((1, "not a hub id"))
    app.convert_hub_id()
    assert "expected 'owner/model'" in rumps.alerts[-1][1]


def test_convert_and_add_folder(make_app, rumps, models_folder, pair_dir, tmp_path):
    app = make_app()
    source = pair_dir("e2b", True, "text")[0]
    rumps.window_answers.append((1, str(source)))  # a local HF folder converts like a hub id
    app.convert_hub_id()
    pump(app, lambda: app.status_item.title.startswith("Converted to"))
    assert any(label.startswith(f"{source.name}-mlx · ") for label in app.model_paths)
    other = tmp_path / "other"
    other.mkdir()
    rumps.window_answers.append((1, str(other)))
    app.add_folder()
    assert app.settings.models_folder == str(other)
    assert next(iter(app.menu["Model"])).startswith("No models in")
    rumps.window_answers.append((1, str(source)))  # a single model folder: selected and listed
    app.add_folder()
    assert app.settings.last_model == str(source)
    assert app.model_paths[label_of(app, source.name)] == str(source)


def test_corrupt_settings_notice_is_shown_once(make_app, rumps, tmp_path):
    (tmp_path / "settings.json").write_text("{oops")
    app = make_app()
    assert app.settings == Settings()  # defaults
    app.drain()
    app.drain()
    assert len([a for a in rumps.alerts if "could not be read" in a[1]]) == 1


def test_quit_stops_the_worker(make_app, rumps):
    app = make_app()
    app.quit()
    assert rumps.quit_calls == 1 and not app.worker.is_alive() and not app.timer.running


def test_memory_hint_and_listing(models_folder, tmp_path):
    gb = 1 << 30
    assert models.memory_hint(4 * gb, 16 * gb) == "fits"
    assert models.memory_hint(13 * gb, 16 * gb) == "tight"
    assert models.memory_hint(20 * gb, 16 * gb) == "too big"
    assert models.memory_hint(gb, None) == "?"
    assert (models.total_memory() or 0) > 0
    assert models.format_bytes(512) == "512 B" and models.format_bytes(3 * gb // 2) == "1.5 GB"
    entries = models.find_models(models_folder)
    assert [e.name for e in entries] == ["broken", "tiny-e2b"]
    assert entries[1].has_drafter and entries[1].size_bytes > 10_000
    (tmp_path / "drafter-only").mkdir()
    (tmp_path / "drafter-only" / "config.json").write_text(json.dumps({"model_type": "gemma4_assistant"}))
    assert models.find_models(tmp_path) == [] and models.find_models(tmp_path / "missing") == []


def test_server_menu_starts_and_stops_the_local_server(make_app, rumps, models_folder, tmp_path):
    with socket.socket() as probe:  # a port that is free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = make_app(last_model=str(models_folder / "tiny-e2b"), server_port=port)
    assert app.server_item.title == f"Start Server (127.0.0.1:{port})"
    app.toggle_server()
    pump(app, lambda: app.server_url is not None)
    assert app.server_item.title == f"Stop Server (http://127.0.0.1:{port}/v1)"
    assert app.status_item.title.startswith("Serving at")
    app.toggle_server()
    pump(app, lambda: app.server_url is None)
    assert app.server_item.title.startswith("Start Server") and app.status_item.title == "Server stopped"
    rumps.window_answers.append((1, "70000"))
    app.set_port()
    assert "1 to 65535" in rumps.alerts[-1][1] and app.settings.server_port == port
    rumps.window_answers.append((1, "8123"))
    app.set_port()
    assert load_settings(tmp_path / "settings.json")[0].server_port == 8123
    assert app.server_item.title == "Start Server (127.0.0.1:8123)"


# --- attachments ---


@pytest.fixture(scope="module")
def media_model(tmp_path_factory):
    """A tiny multimodal bundle (vision + audio towers)."""
    path = tmp_path_factory.mktemp("media-e2b")
    write_media_pair(path, "e2b")
    return path


class FakePasteboard:
    """NSPasteboard's `types()` and `dataForType_` over a dict."""

    def __init__(self, **data):
        self.data = {key.replace("_", "-").replace("public-", "public."): value for key, value in data.items()}

    def types(self):
        return list(self.data)

    def dataForType_(self, kind):
        return self.data.get(kind)


def test_pasteboard_image_as_png():
    from PIL import Image

    app_module = importlib.import_module("apps.menubar.app")
    png = image_bytes(20, 12, 4)
    assert app_module.pasteboard_png(FakePasteboard(public_png=png, public_tiff=b"ignored")) == png
    tiff = io.BytesIO()
    Image.open(io.BytesIO(png)).save(tiff, format="TIFF")  # what most apps copy
    converted = app_module.pasteboard_png(FakePasteboard(public_tiff=tiff.getvalue()))
    assert converted.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(converted)).tobytes() == Image.open(io.BytesIO(png)).tobytes()
    with pytest.raises(ValueError, match="holds no image"):
        app_module.pasteboard_png(FakePasteboard(public_utf8_plain_text=b"hello"))
    with pytest.raises(ValueError, match="holds no image"):
        app_module.pasteboard_png(FakePasteboard(public_png=b""))
    with pytest.raises(ValueError, match="Attach Files"):  # a file copied in Finder: its TIFF is the icon
        app_module.pasteboard_png(FakePasteboard(public_file_url=b"file:///a.png", public_tiff=tiff.getvalue()))
    cmyk = io.BytesIO()
    Image.new("CMYK", (6, 4), (0, 255, 0, 0)).save(cmyk, format="TIFF")  # PNG has no CMYK: converted
    assert Image.open(io.BytesIO(app_module.pasteboard_png(FakePasteboard(public_tiff=cmyk.getvalue())))).mode == "RGBA"
    with pytest.raises(ValueError, match="could not be read"):
        app_module.pasteboard_png(FakePasteboard(public_tiff=b"not a tiff"))


def test_screenshot_runs_screencapture_and_a_cancel_attaches_nothing():
    app_module = importlib.import_module("apps.menubar.app")
    calls = []

    def fake_run(writes):
        def run(command, check):
            calls.append(command)
            if writes is not None:
                Path(command[-1]).write_bytes(writes)

        return run

    assert app_module.take_screenshot(fake_run(b"\x89PNG data")) == b"\x89PNG data"
    assert calls[-1][:3] == ["screencapture", "-i", "-x"] and calls[-1][-1].endswith(".png")
    assert not Path(calls[-1][-1]).exists()  # the temporary file is gone once read
    assert app_module.take_screenshot(fake_run(None)) is None  # Esc: no file
    assert app_module.take_screenshot(fake_run(b"")) is None  # or an empty one


def test_labels_and_ask_building():
    app_module = importlib.import_module("apps.menubar.app")
    cat, clip = Attachment(IMAGE, "/x/cat.png", "cat.png"), Attachment(AUDIO, b"RIFF", "clip.wav")
    assert app_module.attachments_title([]) == "Attachments"
    assert app_module.attachments_title([cat, clip]) == "Attachments (2)"
    assert app_module.attachment_label(2, clip) == "2. clip.wav (audio)"
    settings = Settings(max_tokens=7, temperature=0.5, speculative_mode="on", num_draft_tokens=4)
    assert app_module.build_ask("q", settings, [cat, clip]) == Ask("q", 7, 0.5, 4, (cat, clip))
    assert app_module.build_ask("q", settings) == Ask("q", 7, 0.5, 4)
    assert app_module.picker_extensions((IMAGE,)) == list(app_module.IMAGE_EXTENSIONS)
    assert "wav" in app_module.picker_extensions((IMAGE, AUDIO)) and app_module.picker_extensions(()) == []
    files = app_module.file_attachments(["/x/cat.png", "/x/clip.WAV", "/x/notes.txt"])
    assert files == [cat, Attachment(AUDIO, "/x/clip.WAV", "clip.WAV")]
    # videos: offered whenever images are (the vision tower reads the frames), listed as "(video)"
    film = Attachment(VIDEO, "/x/film.MOV", "film.MOV")
    assert app_module.file_attachments(["/x/film.MOV", "/x/anim.gif"]) == [
        film, Attachment(IMAGE, "/x/anim.gif", "anim.gif")]
    assert app_module.attachment_label(3, film) == "3. film.MOV (video)"
    assert app_module.picker_extensions((IMAGE, VIDEO)) == [*app_module.IMAGE_EXTENSIONS, *app_module.VIDEO_EXTENSIONS]
    assert {"mp4", "m4v", "mov", "webm", "mkv", "avi"} <= set(app_module.picker_extensions(media_kinds(None)))
    assert app_module.build_ask("q", settings, [film]).attachments == (film,)


def test_attachments_menu_goes_with_the_next_question(make_app, rumps, media_model, tmp_path, monkeypatch):
    app = make_app(last_model=str(media_model), max_tokens=6, speculative_mode="off")
    app_module = sys.modules["apps.menubar.app"]
    png, wav = image_bytes(24, 16, 0), wav_bytes(0.4, 0)
    (tmp_path / "cat.png").write_bytes(png)
    (tmp_path / "clip.wav").write_bytes(wav)
    offered = []
    monkeypatch.setattr(app_module, "choose_files", lambda ext: offered.append(ext) or [
        str(tmp_path / "cat.png"), str(tmp_path / "clip.wav")])
    menu = app.attach_menu
    assert menu.title == "Attachments" and menu["Clear Attachments"].callback is None
    menu["Attach Files…"].callback(None)
    assert "png" in offered[-1] and "wav" in offered[-1]  # this model takes audio too
    assert "mp4" in offered[-1] and "mov" in offered[-1]  # and video, as it takes images
    # the clipboard: no image is a notification, an image is attached as PNG bytes
    monkeypatch.setattr(app_module, "clipboard_png", lambda: app_module.pasteboard_png(FakePasteboard()))
    menu["Paste Image"].callback(None)
    assert "holds no image" in rumps.notifications[-1][2] and len(app.attachments) == 2
    monkeypatch.setattr(app_module, "clipboard_png", lambda: png)
    menu["Paste Image"].callback(None)
    monkeypatch.setattr(app_module, "take_screenshot", lambda: None)  # cancelled
    menu["Attach Screenshot…"].callback(None)
    assert len(app.attachments) == 3
    monkeypatch.setattr(app_module, "take_screenshot", lambda: png)
    menu["Attach Screenshot…"].callback(None)
    assert app.attach_menu.title == "Attachments (4)"
    assert [a.name for a in app.attachments] == ["cat.png", "clip.wav", "Pasted image 1", "Screenshot 1"]
    for line in ("1. cat.png (image)", "2. clip.wav (audio)", "3. Pasted image 1 (image)", "4. Screenshot 1 (image)"):
        assert line in menu and menu[line].callback is None  # listed, greyed
    menu["Clear Attachments"].callback(None)
    assert app.attachments == [] and menu.title == "Attachments" and "1. cat.png (image)" not in menu
    # two attached, then asked: they go with that question (in order) and the menu is empty again
    menu["Attach Files…"].callback(None)
    rumps.window_answers += [(1, "what is this?"), (0, "")]  # the question, then Close on the answer
    app.ask()
    assert "With cat.png, clip.wav" in rumps.windows[-1].message
    assert app.attachments == [] and menu.title == "Attachments"
    pump(app, lambda: not app.generating)
    assert rumps.windows[-1].title == "Answer" and app.sent == ()
    parts = app.worker.history[0]["content"]
    assert parts == [{"type": "image", "image": png}, {"type": "audio", "audio": wav},
                     {"type": "text", "text": "what is this?"}]
    # a question whose attachment fails is not added to the chat, and its attachments are pending again
    (tmp_path / "notes.png").write_text("not an image")
    monkeypatch.setattr(app_module, "choose_files", lambda ext: [str(tmp_path / "notes.png")])
    menu["Attach Files…"].callback(None)
    rumps.window_answers.append((1, "and this?"))
    app.ask()
    pump(app, lambda: not app.generating)
    assert "notes.png" in rumps.alerts[-1][1] and len(app.worker.history) == 2
    assert [a.name for a in app.attachments] == ["notes.png"] and menu.title == "Attachments (1)"


def test_a_text_only_model_takes_no_attachments(make_app, rumps, models_folder, monkeypatch):
    app = make_app(last_model=str(models_folder / "tiny-e2b"))
    app_module = sys.modules["apps.menubar.app"]
    monkeypatch.setattr(app_module, "choose_files", lambda ext: pytest.fail("no panel for a text-only model"))
    monkeypatch.setattr(app_module, "take_screenshot", lambda: pytest.fail("no screenshot either"))
    app.attach_menu["Attach Files…"].callback(None)
    app.attach_menu["Attach Screenshot…"].callback(None)
    assert all("tiny-e2b takes no images" in n[2] for n in rumps.notifications[-2:]) and app.attachments == []

    def no_notification_center(*args, **kwargs):
        raise RuntimeError("Failed to setup the notification center")  # rumps, run outside an .app bundle

    monkeypatch.setattr(rumps, "notification", no_notification_center)
    app.attach_menu["Paste Image"].callback(None)
    assert "tiny-e2b takes no images" in rumps.alerts[-1][1]  # an alert instead
