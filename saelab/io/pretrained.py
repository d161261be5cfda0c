"""Named public releases (`saelab/pretrained.yaml`): `load_sae(release, sae_id=...)` resolves them to a hub
repo folder."""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from saelab.core.config import closest
from saelab.core.files import FileFormatError


@lru_cache(maxsize=1)
def pretrained_releases() -> dict[str, dict[str, Any]]:
    """The releases saelab knows by name."""
    return yaml.safe_load(resources.files("saelab").joinpath("pretrained.yaml").read_text(encoding="utf-8"))


def resolve_release(release: str, sae_id: str | None) -> tuple[str, str, str | None]:
    """(repo_id, subfolder, model_name) of one SAE of a named release; clear errors for unknown releases or ids.
    model_name is the Hugging Face model saelab opens for it (SAELens files may name TransformerLens's)."""
    releases = pretrained_releases()
    if release not in releases:
        hint = closest(release, releases)
        raise FileFormatError(
            f"unknown release '{release}'"
            + (f"; did you mean '{hint}'?" if hint else "")
            + f" Known releases: {', '.join(releases)}"
        )
    entry = releases[release]
    if sae_id is None or not re.fullmatch(entry["sae_id_pattern"], sae_id):
        raise FileFormatError(
            f"release '{release}' needs an sae_id like '{entry['example_sae_id']}' "
            f"(pattern {entry['sae_id_pattern']}), got {sae_id!r}"
        )
    return entry["repo_id"], sae_id, entry.get("model_name")
