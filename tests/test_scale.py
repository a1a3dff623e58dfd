"""The real-size measurement script (mlx_gemma_mtp/bench/scale.py) at a tiny cut: every step runs in its own measured
process and lands in the table, greedy MTP prints what plain decoding prints, and the work folder is removed.
(At a tiny cut the memory ratios mean nothing: the import baseline dwarfs the model. The E2B numbers are in the
README.)"""

from __future__ import annotations

from mlx_gemma_mtp.bench import scale
from mlx_gemma_mtp.testing.tokenizer import write_gemma4_tokenizer


def test_scale_script_runs_every_step_at_a_tiny_cut(tmp_path, capsys):
    argv = ["--shape", "e2b", "--layers", "2", "--vocab", "512", "--max-tokens", "3", "--prompt-tokens", "4",
            "--train-layers", "2", "--train-seq-len", "16", "--train-steps", "1", "--work", str(tmp_path)]
    scale.main(argv)
    out = capsys.readouterr().out
    assert out.startswith("python -m mlx_gemma_mtp.bench.scale --shape e2b")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines()[3:]}
    steps = ["import mlx_gemma_mtp.convert", "convert -q --recipe mixed", "eval-quant (convert --report)",
             "load (4-bit bundle)", "generate 3 tokens, plain", "generate 3 tokens, MTP K=1",
             "target (2 layers, float32) + drafter loaded", "train-drafter 1 steps, 4 x 16, unroll 4"]
    assert list(rows) == steps
    assert "output == plain" in rows["generate 3 tokens, MTP K=1"]
    assert "mean KL" in rows["eval-quant (convert --report)"] and "drafter loaded" in rows["load (4-bit bundle)"]
    assert "step 1/1 loss" in rows["train-drafter 1 steps, 4 x 16, unroll 4"]
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_covers_every_id_and_speaks_gemma_4(tmp_path):
    from mlx_gemma_mtp.load import load_tokenizer

    write_gemma4_tokenizer(tmp_path, 512, scale.CHAT_TEMPLATE)
    tok = load_tokenizer(tmp_path, [1, 106])
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert ids[:2] == [2, 105] and ids[-3:-1] == [105, tok.encode("model", add_special_tokens=False)[0]]
    assert tok.decode([511]) == "<unused511>" and tok.decode(tok.encode("the user", add_special_tokens=False)) == \
        "the user"
