"""Shared by the test files: the tests folder on sys.path (for tiny.py and peer_files.py), and a faked hub."""

import pathlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture
def hub_downloads(tmp_path, monkeypatch):
    """snapshot_download replaced by the local folder tmp_path/snapshot; returns the calls it received."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    return calls


@pytest.fixture
def fake_hub_api(monkeypatch):
    """huggingface_hub.HfApi replaced by a recorder of what would be uploaded (no network)."""
    import huggingface_hub

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            uploaded["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, path_in_repo=None, commit_message=None):
            uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            uploaded["path_in_repo"] = path_in_repo
            return "https://example/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return uploaded
