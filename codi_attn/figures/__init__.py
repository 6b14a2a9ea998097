"""Every figure of codi-attn, one module per part of the analysis: `extraction` (the captured attention),
`metrics` (head scores, one model and two), `validation` (the causal checks). Cards and `export` both draw
from here."""
