"""Upload a trained pipeline folder to the Hugging Face Hub, never its checkpoints or logs."""

from __future__ import annotations

import glob
import json
import os
import shlex
from typing import List, Optional

from ..redaction import redact

# Training leftovers that do not belong in a model repo (checkpoints can be tens of GB each), and the default tracker
# folder (`push_folder` adds another `--logging_dir`).
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", ".tmp-checkpoint-*", ".tmp-*/**", ".*", "logs/**"]
# The adapter alone, as Diffusers names it (`save_lora_adapter`, `load_lora_weights`), beside the trained pipeline of
# a --lora_rank run; a run without LoRA removes it, from the folder and from the repo it pushes to.
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


class HubUploadError(RuntimeError):
    """The upload failed; the local save is complete and untouched."""


def upload_failure(error: Exception, upload: str, then: str) -> HubUploadError:
    """The one-line error of a failed upload, whatever failed (HTTP, network, auth): `upload <upload> failed (<the
    error's type and first line, tokens redacted>); <then>` (`then`: what is kept, how to retry)."""
    reason = redact(str(error).strip().splitlines()[0]) if str(error).strip() else error.__class__.__name__
    return HubUploadError(f"upload {upload} failed ({error.__class__.__name__}: {reason}); {then}")


def push_folder(
    output_dir: str,
    repo_id: Optional[str] = None,
    token: Optional[str] = None,
    private: bool = False,
    logging_dir: str = "logs",
    replace_card: bool = False,
) -> str:
    """Create the repo if needed and upload `output_dir` to it, but its checkpoints and tracker logs; return the
    commit URL. Where the run's card is one this package wrote, a repo's model card that this package did not write,
    or that was edited since (on the Hub), is kept unless `replace_card`: the run's card then stays in `output_dir`
    only (`model_card.local_card_withheld`, which logs the command that uploads it anyway: `push_model_card`'s).

    Args:
        output_dir: the training run's folder.
        repo_id: the repo; default: the folder's name, in the token's namespace.
        token: the Hub token; default: huggingface_hub's (`HF_TOKEN`, `hf auth login`).
        private: create the repo private.
        logging_dir: the trackers' folder (`--logging_dir`): relative to `output_dir`, or absolute.
        replace_card: upload the folder's card (naming `repo_id`, with the pictures it shows) in place of the one the
            repo has, whoever wrote that.

    Raises:
        HubUploadError: naming the reason, the intact local folder and how to retry.
    """
    from huggingface_hub import CommitOperationDelete, HfApi

    from ..model_card import card_for_repo, local_card_withheld
    from ..pipelines.base import stale_hub_files

    repo_id = repo_id or os.path.basename(os.path.abspath(output_dir))
    ignore_patterns = _ignore_patterns(output_dir, logging_dir)
    api = HfApi(token=token)
    message = "Upload SR3 pipeline trained with diffusers-sr3"
    try:
        repo_id = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
        card = None
        if not replace_card and local_card_withheld(api, repo_id, output_dir):
            ignore_patterns = ignore_patterns + ["README.md"]
        elif os.path.isfile(os.path.join(output_dir, "README.md")):
            # Without --hub_model_id the card was written naming the output folder; the repo is `user/folder`.
            card = card_for_repo(output_dir, repo_id)
        uploads = _uploaded_files(output_dir, ignore_patterns)
        # Deleted in the upload's commit: the repo never holds the new model beside an earlier run's adapter (which
        # `load_lora_weights` would apply to it) or weights.
        stale = stale_hub_files(api, repo_id, uploads, output_dir, optional_files=[LORA_WEIGHTS_FILE])
        if card is None:
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=output_dir,
                commit_message=message,
                ignore_patterns=ignore_patterns,
                # Exact names (a pattern would match more where a name holds `[`); None: no second listing.
                delete_patterns=[glob.escape(path) for path in stale] or None,
            )
        else:
            commit = api.create_commit(
                repo_id=repo_id,
                operations=[CommitOperationDelete(path_in_repo=path) for path in stale]
                + _upload_operations(output_dir, card, uploads),
                commit_message=message,
            )
    except Exception as error:  # any failure (HTTP, network, auth) is reported the same way: local save is intact
        retry = push_folder_command(output_dir, repo_id, private, logging_dir, replace_card)
        raise upload_failure(
            error,
            f"to {api.endpoint}/{repo_id}",
            f"the trained pipeline is saved and intact in {output_dir}; retry with `{retry}`",
        ) from error
    return commit.commit_url


def push_folder_command(
    output_dir: str, repo_id: str, private: bool = False, logging_dir: str = "logs", replace_card: bool = False
) -> str:
    """The shell command (`python -c ...`) that runs `push_folder` with these arguments.

    Through push_folder, not `hf upload`: it leaves out the same files, names the repo in the card and uploads the
    pictures the card shows.
    """
    options = ", private=True" if private else ""
    if logging_dir != "logs":
        options += f", logging_dir={_literal(logging_dir)}"
    if replace_card:
        options += ", replace_card=True"
    return _call_command("push_folder", f"{_literal(output_dir)}, {_literal(repo_id)}{options}")


def push_model_card(folder: str, repo_id: str, create_pr: bool = False, token: Optional[str] = None) -> str:
    """Upload the model card of `folder` to the Hub repo `repo_id` in place of the one it has, whoever wrote that:
    one commit of the card (naming `repo_id` where it was written under another name: `model_card.card_for_repo`)
    and the pictures it shows (`model_card.images_shown`), none of the folder's other files.

    Args:
        folder: the folder holding the card (`README.md`): a training run's or a `save_pretrained` one.
        repo_id: the repo, which exists.
        create_pr: open a pull request with the commit instead of committing to the main branch.
        token: the Hub token; default: huggingface_hub's (`HF_TOKEN`, `hf auth login`).

    Returns:
        The commit URL.

    Raises:
        FileNotFoundError: `folder` has no `README.md`.
        HubUploadError: naming the reason and how to retry.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from ..model_card import card_uploads

    card = os.path.join(folder, "README.md")
    if not os.path.isfile(card):
        raise FileNotFoundError(f"{folder} has no model card (README.md) to upload")
    uploads = card_uploads(folder, repo_id)
    api = HfApi(token=token)
    try:
        commit = api.create_commit(
            repo_id=repo_id,
            operations=[
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=source)
                for name, source in sorted(uploads.items())
            ],
            commit_message="Upload the model card written by diffusers-sr3",
            create_pr=create_pr,
        )
    except Exception as error:  # as push_folder: any failure (HTTP, network, auth) is reported the same way
        retry = push_model_card_command(folder, repo_id, create_pr)
        raise upload_failure(error, f"of {card} to {api.endpoint}/{repo_id}", f"retry with `{retry}`") from error
    return commit.commit_url


def push_model_card_command(folder: str, repo_id: str, create_pr: bool = False) -> str:
    """The shell command (`python -c ...`) that runs `push_model_card` with these arguments."""
    options = ", create_pr=True" if create_pr else ""
    return _call_command("push_model_card", f"{_literal(folder)}, {_literal(repo_id)}{options}")


def _call_command(function: str, arguments: str) -> str:
    """The shell command (`python -c ...`) that calls this module's `function` with `arguments` (Python source)."""
    code = f"from diffusers_sr3.training.hub import {function}; {function}({arguments})"
    return f"python -c {shlex.quote(code)}"


def _literal(text: str) -> str:
    """`text` as a double-quoted Python string literal, which a single-quoted shell word holds as it is."""
    return json.dumps(text)


def _ignore_patterns(output_dir: str, logging_dir: str) -> List[str]:
    """`UPLOAD_IGNORE_PATTERNS`, and the tracker folder `logging_dir` where it lies inside `output_dir`."""
    logs = os.path.relpath(os.path.join(output_dir, logging_dir), output_dir)
    if logs == os.curdir or logs.split(os.sep)[0] == os.pardir:
        return UPLOAD_IGNORE_PATTERNS
    # Escaped: a folder named `runs[1]` is a name, not a pattern.
    return UPLOAD_IGNORE_PATTERNS + [glob.escape(logs.replace(os.sep, "/")) + "/**"]


def _uploaded_files(output_dir: str, ignore_patterns: List[str]) -> List[str]:
    """The files that `upload_folder` uploads from `output_dir` (`ignore_patterns` left out), `/`-separated."""
    from huggingface_hub.utils import filter_repo_objects

    files = [
        os.path.relpath(os.path.join(root, name), output_dir).replace(os.sep, "/")
        for root, _, names in os.walk(output_dir)
        for name in names
    ]
    return sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))


def _upload_operations(output_dir: str, card: str, files: List[str]) -> list:
    """The upload of `files` of `output_dir`, with `card` as README.md."""
    from huggingface_hub import CommitOperationAdd

    return [
        CommitOperationAdd(
            path_in_repo=name,
            path_or_fileobj=card.encode("utf-8") if name == "README.md" else os.path.join(output_dir, name),
        )
        for name in files
    ]
