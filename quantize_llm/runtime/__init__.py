"""Runtime: the dequant-matmul op, QuantLinear, and loading quantized checkpoints into models."""
