"""codi-attn: per-head attention between the six continuous thoughts of CODI models."""
