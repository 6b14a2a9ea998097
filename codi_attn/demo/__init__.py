"""The offline demo CODI model: its task (`task`), tokenizer (`tokenizer`), model (`codi`), training (`train`),
evaluation (`evaluate`) and model card (`card`); the trained files live in `weights/`.

    python -m codi_attn.demo.train --out codi_attn/demo/weights --seed 0              # train (about 22 min, 1 thread)
    python -m codi_attn.demo.train --out codi_attn/demo/weights --seed 0 --baseline   # the no-CoT baseline
    python -m codi_attn.demo.train --out codi_attn/demo/weights --evaluate            # re-measure every mode
"""
