"""Upload a finished training output folder to the Hugging Face Hub (`--push_to_hub`).

Usage in a script, after `save_pretrained` and `write_model_card`::

    if args.push_to_hub and accelerator.is_main_process:
        push_folder_to_hub(args.output_dir, args.hub_model_id or Path(args.output_dir).name, token=args.hub_token)

Never called in tests: it needs the network and a token.
"""

from typing import Optional, Sequence

# Training state stays local: checkpoints hold optimizer states and RNG, logs and grids can be large.
DEFAULT_IGNORE_PATTERNS = ("checkpoint-*", "checkpoint-*/**", "logs/**", "*.partial/**", "*.jsonl")


def push_folder_to_hub(
    folder: str,
    repo_id: str,
    token: Optional[str] = None,
    private: bool = False,
    commit_message: str = "Upload trained pipeline",
    ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS,
) -> str:
    """Create `repo_id` if needed and upload `folder` (minus training state). Returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message,
        ignore_patterns=list(ignore_patterns),
    )
    return str(commit)
