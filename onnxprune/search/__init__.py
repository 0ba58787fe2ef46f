"""Target-driven pruning: units, temporary masks, sensitivities, search and plans."""
