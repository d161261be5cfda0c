"""Language models with named hook points, and how to load them."""

from saelab.models.hooks import HookedModel, HookPoint, UnknownHookError, discover_hook_points
from saelab.models.loading import DEFAULT_MODEL, load_model

__all__ = ["DEFAULT_MODEL", "HookPoint", "HookedModel", "UnknownHookError", "discover_hook_points", "load_model"]
