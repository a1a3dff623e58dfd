"""Benchmarks and measurement scripts, each run as `python -m mlx_gemma_mtp.bench[.NAME]`:

- `bench` (`decoding`): plain vs MTP tokens/s per draft length and "auto", side by side in one run; mlx-lm and
  mlx-vlm on the same weights; `--calibrate` saves this machine's draft costs as auto's prior.
- `bench.gpu`: the four released shapes at 4-bit and bfloat16 in one table (for a GPU).
- `bench.conversation`: time to first token per turn with and without the prompt cache.
- `bench.sampling`: sampling cost at the released 262,144-token vocabulary.
- `bench.forward`: target forward and drafter step times per row count.
- `bench.distributed`: one process vs a tensor-parallel group.
- `bench.scale`: convert / load / eval-quant / train-drafter at the released E2B/E4B shapes, peak memory per step.
- `bench.multimodal`: an image prompt: time to first token and MTP on the answer, ours vs mlx-vlm; tower memory.
- `bench.batching`: 1-8 concurrent streams: serial vs batched plain vs batched MTP.
- `bench.auto_regret`: the draft-length policy on simulated cost landscapes: regret vs the best fixed K.
- `bench.batch_auto_regret`: the same for a batch's draft length (rows with their own acceptance).
Helpers: `shapes` (random released-shape pairs, mlx-lm's plain decoding), `cost_model` (expected speedup per K),
`mlx_vlm` (mlx-vlm's MTP path on our weights), `mlx_vlm_image` (its image path, for `bench.multimodal`),
`batch_oracle` (`bench.batching`'s forced acceptance).
"""
