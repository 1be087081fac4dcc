"""Upload a trained pipeline folder to the Hugging Face Hub, never its checkpoints or logs."""

from __future__ import annotations

import os
from typing import Optional

from ..redaction import redact

# Training leftovers that do not belong in a model repo (checkpoints can be tens of GB each).
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", ".tmp-checkpoint-*", ".tmp-*/**", ".*", "logs/**"]


class HubUploadError(RuntimeError):
    """The upload failed; the local save is complete and untouched."""


def push_folder(
    output_dir: str, repo_id: Optional[str] = None, token: Optional[str] = None, private: bool = False
) -> str:
    """Create the repo if needed and upload `output_dir` to it; return the commit URL.

    Raises:
        HubUploadError: naming the reason and the intact local folder.
    """
    from huggingface_hub import HfApi

    from ..model_card import card_for_repo

    repo_id = repo_id or os.path.basename(os.path.abspath(output_dir))
    api = HfApi(token=token)
    message = "Upload SR3 pipeline trained with diffusers-sr3"
    try:
        repo_id = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
        # Without --hub_model_id the card was written naming the output folder; the repo is `user/folder`.
        card = card_for_repo(output_dir, repo_id) if os.path.isfile(os.path.join(output_dir, "README.md")) else None
        if card is None:
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=output_dir, commit_message=message, ignore_patterns=UPLOAD_IGNORE_PATTERNS
            )
        else:
            commit = api.create_commit(
                repo_id=repo_id, operations=_upload_operations(output_dir, card), commit_message=message
            )
    except Exception as error:  # any failure (HTTP, network, auth) is reported the same way: local save is intact
        reason = redact(str(error).strip().splitlines()[0]) if str(error).strip() else error.__class__.__name__
        raise HubUploadError(
            f"upload to {api.endpoint}/{repo_id} failed ({error.__class__.__name__}: {reason}); the trained pipeline "
            f"is saved and intact in {output_dir}; retry with `hf upload {repo_id} {output_dir} "
            "--exclude 'checkpoint-*/**' --exclude 'logs/**'`"
        ) from error
    return commit.commit_url


def _upload_operations(output_dir: str, card: str) -> list:
    """What `upload_folder` would upload from `output_dir` (the same ignore patterns), with `card` as README.md."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.utils import filter_repo_objects

    files = [
        os.path.relpath(os.path.join(root, name), output_dir).replace(os.sep, "/")
        for root, _, names in os.walk(output_dir)
        for name in names
    ]
    return [
        CommitOperationAdd(
            path_in_repo=name,
            path_or_fileobj=card.encode("utf-8") if name == "README.md" else os.path.join(output_dir, name),
        )
        for name in sorted(filter_repo_objects(files, ignore_patterns=UPLOAD_IGNORE_PATTERNS))
    ]
