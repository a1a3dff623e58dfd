"""Fixtures for tests and benchmarks: random-weight pairs of the released shapes (`presets`) and a
Gemma-4-like test tokenizer (`tokenizer`). Not used by the engine."""
