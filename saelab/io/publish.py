"""Publishing SAEs on the Hugging Face hub, always in a form SAELens loads (see `saelens_compat.to_saelens`)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from saelab.io.load import load_sae
from saelab.io.saelens_compat import to_saelens
from saelab.io.saelens_format import save_saelens
from saelab.saes.base import SAE
from saelab.saes.files import CFG_FILE, WEIGHTS_FILE, save_sae


def push_to_hub(
    sae: SAE,
    repo_id: str,
    path_in_repo: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload SAE with saelab",
) -> str:
    """Upload an SAE to `repo_id[/path_in_repo]` in a form SAELens loads (`save_saelens`: BatchTopK and
    Matryoshka as JumpReLU, ...), creating the repo if needed; returns the commit URL. An SAE SAELens has no
    equivalent of is refused (ValueError) before anything is uploaded."""
    with tempfile.TemporaryDirectory(prefix="saelab-upload-") as folder:
        save_saelens(sae, folder)
        return _upload(folder, repo_id, path_in_repo, private, token, commit_message)


def upload_sae_folder(
    path: str | Path,
    repo_id: str,
    path_in_repo: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload SAE with saelab",
) -> str:
    """Upload a saved SAE folder (`saelab upload`) in a form SAELens loads. A saelab/SAELens folder goes with its
    other files (sparsity, eval report, plots): as it is when SAELens reads it directly, else with its SAE
    converted (`to_saelens`). Any other format saelab reads is converted to the SAELens layout."""
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
