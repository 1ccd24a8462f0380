"""``python -m experiments.bench``: see :mod:`experiments.bench`."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from experiments.bench import __doc__ as DOC
from experiments.bench.authors import AUTHORS_REPO, AuthorsCodeError, AuthorsPlan, check_checkout
from experiments.bench.cases import make_plan
from experiments.bench.report import machine_info, write_outputs
from experiments.bench.suite import run
from experiments.bench.training import TrainingPlan
from experiments.models import POOLINGS, parse_label


def _pooling(label: str) -> str:
    try:
        parse_label(label)
    except (ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return label


def _checkout(path: str) -> Path:
    try:
        return check_checkout(path)
    except AuthorsCodeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=DOC.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, K=4 only, capped scaling")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"),
                        help="output folder (default runs/bench; the committed results: --out docs/bench)")
    parser.add_argument("--repeats", type=int, help="timed repeats per method (default: 5 quick, 15 full)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--training", action="store_true",
                        help="also time training epochs of GIN on PROTEINS per pooling (one thread)")
    parser.add_argument("--training-epochs", type=int, default=TrainingPlan.epochs, help="timed epochs per pooling")
    parser.add_argument("--training-poolings", nargs="+", type=_pooling, default=list(TrainingPlan.poolings),
                        metavar="POOLING", help="poolings timed by --training, the first the baseline of the "
                        f"ratios (default: {' '.join(TrainingPlan.poolings)}; any of {', '.join(POOLINGS)}, or a "
                        "UOT variant as the design tables name it, such as 'uot[prior=power]')")
    parser.add_argument("--root", default=TrainingPlan.root, help="TUDataset root for --training (read only)")
    parser.add_argument("--authors-code", type=_checkout, metavar="DIR",
                        help=f"a checkout of {AUTHORS_REPO}: also time the authors' UOTPooling (BADMM-E, Sinkhorn) "
                        "against ours, imported from DIR (their code is not part of this repository)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    plan = make_plan(args.quick)
    if args.repeats:
        plan.repeats = args.repeats
    if args.training:
        plan.training = TrainingPlan(root=args.root, epochs=args.training_epochs,
                                     poolings=tuple(args.training_poolings))
    if args.authors_code:
        plan.authors = AuthorsPlan(str(args.authors_code))
    command = shlex.join(["python", "-m", "experiments.bench", *(sys.argv[1:] if argv is None else argv)])
    load_before = os.getloadavg()[0]
    df = run(plan, device, args.threads)
    write_outputs(df, args.out, machine_info(device, command, load_before), plan)
    print(f"wrote {args.out}/results.csv, README.md and the scaling plots")


if __name__ == "__main__":
    main()
