"""Metaflow card layouts for AttentionFlow: each module turns artifacts into a list of card components."""
