"""A whole run from one config: the run config, its SAE specs (saes / sweep), the run folder, the runner."""
