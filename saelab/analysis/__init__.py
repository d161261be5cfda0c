"""Studying trained SAEs: splice them into a model, edit and steer, gather per-latent statistics, dashboards,
attribution graphs."""

from saelab.analysis.attribution import AttributionGraph, attribute
from saelab.analysis.dashboard import write_dashboard
from saelab.analysis.features import default_token_sets, feature_statistics, logit_effects, token_set, unembedding
from saelab.analysis.graph_files import write_graph_files
from saelab.analysis.interventions import ablate, clamp, run_with_cache_and_saes, run_with_saes, steer, steering_vector
from saelab.analysis.model_diff import decoder_cosines, diff_summary, relative_decoder_norms
from saelab.analysis.neuronpedia import export_neuronpedia
from saelab.analysis.statistics import FeatureStatistics, FeatureStats
from saelab.splice import SAE_HOOKS, sae_hook_names, spliced

__all__ = [
    "SAE_HOOKS",
    "AttributionGraph",
    "FeatureStatistics",
    "FeatureStats",
    "ablate",
    "attribute",
    "clamp",
    "decoder_cosines",
    "default_token_sets",
    "diff_summary",
    "export_neuronpedia",
    "feature_statistics",
    "logit_effects",
    "relative_decoder_norms",
    "run_with_cache_and_saes",
    "run_with_saes",
    "sae_hook_names",
    "spliced",
    "steer",
    "steering_vector",
    "token_set",
    "unembedding",
    "write_dashboard",
    "write_graph_files",
]
