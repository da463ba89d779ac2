"""Building blocks of the decoder: RMSNorm, tensor-parallel linears and embeddings, rotary."""
