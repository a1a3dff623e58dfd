"""Tensor-parallel Gemma 4 over MLX distributed: the split of the target (`shard`), the lock-step of the decoding
loop (`lockstep`), each rank's share of the weights read from disk (`load`), and the process group (`group`)."""
