"""Language models with named hook points."""

from saelab.models.hooks import HookedModel, HookPoint, UnknownHookError, discover_hook_points

__all__ = ["HookPoint", "HookedModel", "UnknownHookError", "discover_hook_points"]
