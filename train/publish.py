"""`zoo publish FOLDER ORG/NAME`: push a checkpoint folder (config, weights, model card) to the Hub."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    """Check that the folder loads, then upload it with huggingface_hub."""
    parser = argparse.ArgumentParser(prog="zoo publish", description=__doc__)
    parser.add_argument("folder", help="a checkpoint folder, e.g. runs/lm-dense-tiny/final")
    parser.add_argument("repo_id", help="Hub repo id, org/name")
    parser.add_argument("--revision", default=None, help="branch to push to (default main)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in the repo")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    args = parser.parse_args(argv)

    from zoo import hub
    from zoo.loading import load_checkpoint

    load_checkpoint(args.folder)  # refuse to publish anything that does not load
    url = hub.publish(args.folder, args.repo_id, revision=args.revision, private=args.private,
                      overwrite=args.overwrite, token=args.token)
    print(f"published {args.folder} to {url}")
    return 0
