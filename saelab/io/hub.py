"""SAEs on the Hugging Face hub: download a repo folder (through huggingface_hub's cache) and upload one."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from saelab.core.files import FileFormatError

if TYPE_CHECKING:
    from saelab.saes.base import SAE


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


def push_to_hub(sae: "SAE", repo_id: str, path_in_repo: str | None = None, private: bool = False,
                token: str | None = None, commit_message: str = "Upload SAE with saelab") -> str:
    """Upload an SAE to `repo_id[/path_in_repo]` in a form SAELens loads (`save_saelens`: BatchTopK and
    Matryoshka as JumpReLU, ...), creating the repo if needed; returns the commit URL. An SAE SAELens has no
    equivalent of is refused (ValueError) before anything is uploaded."""
    from saelab.io.saelens_format import save_saelens

    with tempfile.TemporaryDirectory(prefix="saelab-upload-") as folder:
        save_saelens(sae, folder)
        return _upload(folder, repo_id, path_in_repo, private, token, commit_message)


def upload_sae_folder(path: str | Path, repo_id: str, path_in_repo: str | None = None, private: bool = False,
                      token: str | None = None, commit_message: str = "Upload SAE with saelab") -> str:
    """Upload a saved SAE folder (`saelab upload`) in a form SAELens loads. A saelab/SAELens folder goes with its
    other files (sparsity, eval report, plots): as it is when SAELens reads it directly, else with its SAE
    converted (`to_saelens`). Any other format saelab reads is converted to the SAELens layout."""
    from saelab.io.load import load_sae
    from saelab.io.saelens_compat import to_saelens
    from saelab.io.saelens_format import CFG_FILE, WEIGHTS_FILE, save_sae

    path = Path(path)
    sae = load_sae(path)  # refuse to publish a folder that does not load
    form = to_saelens(sae)  # or a ValueError saying why SAELens could not read it, before any upload
    if not ((path / CFG_FILE).exists() and (path / WEIGHTS_FILE).exists()):
        return push_to_hub(form, repo_id, path_in_repo, private, token, commit_message)
    if form is sae:
        return _upload(str(path), repo_id, path_in_repo, private, token, commit_message)
    with tempfile.TemporaryDirectory(prefix="saelab-upload-") as folder:
        shutil.copytree(path, folder, dirs_exist_ok=True)
        save_sae(form, folder)  # replaces cfg.json and the weights; latents are unchanged, so the rest still holds
        return _upload(folder, repo_id, path_in_repo, private, token, commit_message)


def _upload(folder: str, repo_id: str, path_in_repo: str | None, private: bool, token: str | None, message: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, path_in_repo=path_in_repo, commit_message=message)
    return str(getattr(info, "commit_url", info))
