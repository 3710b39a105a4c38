"""Other pruning methods (baselines) and the sanity-check variants."""
