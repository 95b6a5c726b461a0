"""Publish local model directories to the Hub that ``HF_ENDPOINT`` names (the demo's local server).

Usage: ``python demo/publish.py DIR REPO_ID [DIR REPO_ID ...]``; prints each repository's commit.
"""

from __future__ import annotations

import sys

from huggingface_hub import HfApi


def main(argv: list[str]) -> int:
    """Create each repository (if missing) and upload its folder in one commit."""
    if len(argv) % 2 or not argv:
        print(__doc__, file=sys.stderr)
        return 2
    api = HfApi()
    for folder, repo_id in zip(argv[::2], argv[1::2], strict=True):
        api.create_repo(repo_id, exist_ok=True)
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=f"Upload {repo_id}")
        print(f"published {folder} -> {repo_id} @ {commit.oid}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
