"""SAE folders from the Hugging Face hub, through huggingface_hub's cache (uploading: saelab/io/publish.py)."""

from __future__ import annotations

from pathlib import Path

from saelab.core.files import FileFormatError


def download_sae_folder(repo_id: str, subfolder: str | None = None, revision: str | None = None) -> Path:
    """The local path of `repo_id[/subfolder]`, downloaded into the hub cache if needed; offline it uses
    the cache, or says it cannot reach the hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [f"{subfolder.strip('/')}/*"] if subfolder else None
    not_local = " (nor is there a local folder of that name)"  # callers come here only when there is none
    try:
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise FileFormatError(
            f"cannot reach the Hugging Face hub for '{repo_id}' and it is not in the local hub cache{not_local}"
        ) from None
    except (HfHubHTTPError, ValueError) as e:
        raise FileFormatError(f"cannot download '{repo_id}'{not_local}: {str(e).splitlines()[0]}") from None
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise FileFormatError(f"'{repo_id}' has no folder '{subfolder}'")
    return folder
