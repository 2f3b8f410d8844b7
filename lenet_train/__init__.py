"""The shared training runtime, framework-free: the flags, data, the one training loop,
checkpoints, run logs, distributed bookkeeping and plots that both ports' programs use."""
