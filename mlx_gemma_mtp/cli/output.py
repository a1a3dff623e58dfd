"""What the terminal commands print: the answer with its thought dimmed, and the generation's stats."""

from __future__ import annotations


def format_stats(r) -> str:
    lines = [
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tokens/s | generation: {r.generation_tokens} "
        f"tokens, {r.generation_tps:.1f} tokens/s | peak memory: {r.peak_memory:.3f} GB"
    ]
    if (d := r.draft) is not None:
        per_pos = " ".join(f"{a:.2f}" for a in d.acceptance_per_position) or "-"
        lines.append(
            f"MTP: {d.rounds} drafting rounds + {d.plain_rounds} plain steps, {d.accepted}/{d.drafted} drafts accepted "
            f"({d.acceptance_rate:.1%}), mean accepted length {d.mean_accepted_length:.2f} per drafting round, "
            f"acceptance per position [{per_pos}]"
        )
    return "\n".join(lines)


class ChannelPrinter:
    """Prints the answer as is and a thought dimmed (ANSI) on a terminal, or under a marker line otherwise."""

    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, out):
        self.out, self.tty, self.channel = out, out.isatty(), "answer"

    def write(self, channel: str, text: str) -> None:
        if not text:
            return
        if channel != self.channel:
            if self.tty:
                self.out.write(self.RESET if channel == "answer" else self.DIM)
            else:
                self.out.write(f"[{'answer' if channel == 'answer' else 'thinking'}]\n")
            self.channel = channel
        self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        self.out.write((self.RESET if self.tty and self.channel != "answer" else "") + "\n")
        self.out.flush()
