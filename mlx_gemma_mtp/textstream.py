"""Generated tokens -> text deltas: streaming detokenizing, stop strings, and Gemma 4's thought channel.

With thinking on, Gemma 4 answers `<|channel>thought\\n…<channel|>answer<turn|>` (`REAL_CHECKPOINTS.md`). The
markers are special tokens and never shown; the text between them is reported under the channel's name
("thought"), the rest under `ANSWER`. The detokenizer is finalized and reset at each marker, so no text of one
channel leaks into the other. Stop strings apply to the answer only: a thought routinely contains what a caller
would use to end an answer (a blank line, "Question:").
"""

from __future__ import annotations

ANSWER = "answer"


class TextStream:
    """Streaming detokenizer plus stop strings: text is held back while it could still start a stop string."""

    def __init__(self, tokenizer, stop: list[str], channels: tuple[int, int] | None = None):
        self.tokenizer = tokenizer
        self.detokenizer = tokenizer.detokenizer if tokenizer is not None else None
        if self.detokenizer is not None:
            self.detokenizer.reset()
        self.stop = [s for s in stop if s]
        self.channels = channels
        self.channel = ANSWER
        self.header: list[int] | None = None  # ids of a channel header being read ("thought\n")
        self.text, self.emitted = "", 0

    def resume(self, prompt: list[int]) -> None:
        """Start in the channel the prompt leaves open: a template may end the prompt inside
        `<|channel>thought\n` (Gemma 4's, with thinking on, after a tool result), so the first tokens are a
        thought. The prompt's own text is never shown."""
        if self.channels is None:
            return
        last = max((i for i, t in enumerate(prompt) if t in self.channels), default=None)
        if last is None or prompt[last] != self.channels[0]:
            return
        head = self.tokenizer.decode(prompt[last + 1 :]) if self.tokenizer is not None else ""
        if "\n" in head:
            self.channel = head.split("\n", 1)[0].strip() or "thought"
        else:  # the header goes on in the answer (the prompt ended right after the marker, or mid-name)
            self.header = list(prompt[last + 1 :])

    def add(self, token: int | None) -> tuple[str, str, bool]:
        """Add a token (None for EOS, which is not shown).

        Returns:
            (the channel the delta belongs to, text now safe to show, whether a stop string was hit).
        """
        if self.detokenizer is None:
            return self.channel, "", False
        channel = self.channel
        if self.channels is not None and token in self.channels:
            delta = self._close_segment()
            opening = token == self.channels[0]
            self.header, self.channel = ([] if opening else None), (self.channel if opening else ANSWER)
            return channel, delta, False
        if self.header is not None and token is not None:
            self._read_header(token)
            return self.channel, "", False
        if token is not None:
            self.detokenizer.add_token(token)
            self.text += self.detokenizer.last_segment
        if self.channel == ANSWER:
            for s in self.stop:
                if (i := self.text.find(s, max(0, self.emitted - len(s)))) >= 0:
                    self.text = self.text[:i]
                    return channel, "", True
        hold = max((len(s) - 1 for s in self.stop), default=0) if self.channel == ANSWER else 0
        safe = max(self.emitted, len(self.text) - hold)
        delta, self.emitted = self.text[self.emitted : safe], safe
        return channel, delta, False

    def _read_header(self, token: int) -> None:
        """Collect the channel's name up to its newline; the name becomes the channel of what follows."""
        self.header.append(token)
        head = self.tokenizer.decode(self.header)
        if "\n" in head:
            name, rest = head.split("\n", 1)
            self.channel, self.header = name.strip() or "thought", None
            self.text += rest

    def _close_segment(self) -> str:
        """Everything not yet shown of the current channel; the detokenizer starts afresh after a marker."""
        self.detokenizer.finalize()
        self.text += self.detokenizer.last_segment
        delta = self.text[self.emitted :]
        self.detokenizer.reset()
        self.text, self.emitted = "", 0
        return delta

    def flush(self, stopped: bool) -> str:
        """The rest of the text at the end of generation (after a stop string: nothing past it)."""
        if self.detokenizer is None:
            return ""
        if not stopped:
            self.detokenizer.finalize()
            self.text += self.detokenizer.last_segment
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta
