"""Low-level pieces every layer may import: typed configs with clear errors, and safe file writes/reads."""
