"""Scoring: the plan, the arena of prunable tensors, draws and their random numbers, the engine and its
backends, BatchNorm and convolution interception, CUDA graphs, the memory plan, scale-out."""
