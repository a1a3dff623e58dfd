"""Drafter training, kept apart from inference as mlx-lm keeps its tuner: distillation of a Gemma 4 MTP
drafter for a given target (`train_drafter`), the initial drafters it starts from (`drafter_init`) and its
token data (`distill_data`). CLI: `mlx-gemma-mtp train-drafter`. Nothing on the decoding path imports this
package.
"""
