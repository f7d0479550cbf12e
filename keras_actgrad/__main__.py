"""`keras-actgrad` / `python -m keras_actgrad`: the command line.

`keras-actgrad report LOG_DIR [--png FILE] [--statistic grad_norm] [--select GLOB]`
prints
one row per probe (forward order) with the first and last probed epoch's
value, the trend and any alert, and optionally saves a heatmap.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from keras_actgrad._report import load_report
from keras_actgrad._tags import DEAD_UNIT_FRACTION, EXPLODING_RATIO, VANISHING_RATIO


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-actgrad",
        description="Tools for the logs of keras-actgrad's ActivationGradientCallback.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report",
        help="print a per-probe table of a run's gradient statistics",
        description="Print one row per probe (forward order): the statistic at "
        "the first and last probed epoch (or step, for the log of a "
        "GradientMonitor), the trend (last / first) and alerts. "
        "Alerts: no gradient (the probe does not reach the loss); "
        f"non-finite (NaN/Inf gradient entries); vanishing / exploding "
        f"(grad_norm below / above the given ratio to the last probe's, the one "
        f"nearest the loss; by default the thresholds the callback was given, "
        f"stored in the logs, else {VANISHING_RATIO:g} / {EXPLODING_RATIO:g}); "
        f"dead units (dead_unit_fraction >= "
        f"{DEAD_UNIT_FRACTION:g}).",
    )
    report.add_argument(
        "log_dir",
        metavar="LOG_DIR",
        help="the `log_dir` given to ActivationGradientCallback",
    )
    report.add_argument(
        "--png",
        metavar="FILE",
        help="also save a probes x epochs heatmap (log colour) to FILE",
    )
    report.add_argument(
        "--select",
        metavar="GLOB",
        action="append",
        help="only the probes whose names match this glob, e.g. "
        "'transformer_layer_1*' or '*/self_attention/*' (repeat for more; "
        "alerts still compare with the run's last probe)",
    )
    report.add_argument(
        "--statistic",
        default="grad_norm",
        help="the statistic to show (default: grad_norm)",
    )
    report.add_argument(
        "--vanishing",
        type=float,
        default=None,
        help="vanishing ratio threshold (default: the callback's "
        f"vanishing_threshold, stored in the logs, else {VANISHING_RATIO:g})",
    )
    report.add_argument(
        "--exploding",
        type=float,
        default=None,
        help="exploding ratio threshold (default: the callback's "
        f"exploding_threshold, stored in the logs, else {EXPLODING_RATIO:g})",
    )
    report.add_argument(
        "--dead-units",
        type=float,
        default=DEAD_UNIT_FRACTION,
        help="dead unit fraction threshold (default: %(default)g)",
    )
    return parser


def _fail(message: str) -> int:
    print(f"keras-actgrad: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code (2 on a usage error)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = _parser().parse_args(argv)
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="replace")
    try:
        report = load_report(args.log_dir)
        if args.select:
            report = report.select(args.select)
        table = report.table(
            args.statistic, args.vanishing, args.exploding, args.dead_units
        )
    except (OSError, ValueError) as error:
        return _fail(str(error))
    print(table)
    if args.png:
        try:
            report.plot(
                args.png,
                args.statistic,
                args.vanishing,
                args.exploding,
                args.dead_units,
            )
        except ImportError:
            return _fail(
                "`--png` needs matplotlib. Install it with "
                "`pip install 'keras-actgrad[report]'`."
            )
        except OSError as error:
            return _fail(f"could not write '{args.png}': {error}")
        print(f"heatmap saved to {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
