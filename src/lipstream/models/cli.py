"""`lipstream models download|check [--root DIR]`: fetch the MuseTalk weights, list what is there."""

from __future__ import annotations

import argparse

from lipstream.errors import WeightsError
from lipstream.models.layout import MODELS_ENV, check_models, verify_checksum


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser("models", help="download or check the MuseTalk weights")
    sub = models.add_subparsers(dest="models_command", required=True)
    root_help = f"models root (default: env {MODELS_ENV} or ./models)"

    download = sub.add_parser("download", help="download the missing MuseTalk files from the Hugging Face Hub "
                                                "(honours HF_ENDPOINT, HF_TOKEN; resumes)")
    download.add_argument("--root", help=root_help)
    download.set_defaults(func=run_download)

    check = sub.add_parser("check", help="list present/missing model files; exit code 1 if any is missing")
    check.add_argument("--root", help=root_help)
    check.add_argument("--verify", action="store_true", help="also compare sha256 digests where published (slow)")
    check.set_defaults(func=run_check)


def run_download(args: argparse.Namespace) -> int:
    from lipstream.models.download import download_models

    download_models(args.root)
    return run_check(argparse.Namespace(root=args.root, verify=False))


def run_check(args: argparse.Namespace) -> int:
    report = check_models(args.root)
    print(f"models root: {report.root}")
    failed = False
    for f in report.present:
        name = f.found(report.root)
        if args.verify and f.sha256 is not None:
            try:
                verify_checksum(report.root, f)
                print(f"  present  {name}  (sha256 ok)")
            except WeightsError as exc:
                print(f"  CORRUPT  {name}  ({exc})")
                failed = True
        else:
            print(f"  present  {name}")
    for f in report.missing:
        print(f"  MISSING  {f.path}  (from {f.repo_id}: {f.repo_file})")
    if report.missing:
        print(f"{len(report.missing)} of {len(report.missing) + len(report.present)} files missing; "
              f"run `lipstream models download --root {report.root}`.")
    return 1 if report.missing or failed else 0
