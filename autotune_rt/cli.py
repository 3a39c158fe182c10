"""Command line: ``autotune-rt``, the seed's ``auto_tune`` / ``auto_tune_realtime``; ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from autotune_rt import __version__
from autotune_rt.console import detect_lang, silence
from autotune_rt.diagnose import MetricNames, Thresholds
from autotune_rt.exceptions import AutotuneError, ConfigError, LaunchError
from autotune_rt.settings import Settings, build_command, check_command

__all__ = ["batch_main", "main", "realtime_main", "split_seed_args"]

USAGE_ERROR = 2
PROG = "autotune-rt"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the default prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def _add(group: argparse._ActionsContainer, name: str, **kwargs: object) -> None:
    """Register ``--name`` and its dashed spelling (``--max_trials`` / ``--max-trials``)."""
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    group.add_argument(*flags, dest=name, **kwargs)  # type: ignore[arg-type]


def _tuning_options(parser: argparse.ArgumentParser, mode: str) -> None:
    seed = parser.add_argument_group("training command (the seed's form)")
    _add(
        seed,
        "base_cmd",
        metavar="SCRIPT",
        help="training script or program; a .py file runs with this "
        "Python (default: none; or give the command after `--`)",
    )
    _add(
        seed,
        "base_args",
        nargs=argparse.REMAINDER,
        default=[],
        metavar="ARG",
        help="the training's own options: everything up to the first option of autotune-rt",
    )

    weights = parser.add_argument_group("initial loss weights")
    for name, default in (
        ("lambda_dol", 0.5),
        ("lambda_col", 0.3),
        ("lambda_hier", 1.5),
        ("lambda_scl", 0.2),
    ):
        _add(weights, name, type=float, default=default, metavar="W", help=f"(default: {default})")
    _add(
        weights,
        "max_grad_norm",
        type=float,
        default=None,
        metavar="W",
        help="initial gradient-clipping bound (default: 1.0; in batch mode passed to the training "
        "only once set or changed)",
    )

    trig = parser.add_argument_group("when to retune")
    _add(
        trig,
        "min_epochs",
        type=int,
        default=10,
        metavar="N",
        help="never retune before N epochs (default: 10)",
    )
    _add(
        trig,
        "patience",
        type=int,
        default=5,
        metavar="N",
        help="retune after N epochs without improvement (default: 5)",
    )
    _add(
        trig,
        "cooldown",
        type=int,
        default=None,
        metavar="N",
        help="epochs to wait after a change before the next (default: --patience)",
    )
    _add(
        trig,
        "max_adjustments",
        type=int,
        default=None,
        metavar="N",
        help="at most N changes (default: no limit)",
    )
    _add(
        trig,
        "metric",
        default=None,
        metavar="NAME",
        help="metric to optimise (default: the first of best_metric, acc1, acc that the training prints)",
    )
    _add(
        trig,
        "mode",
        choices=("max", "min"),
        default="max",
        help="maximise or minimise --metric (default: max)",
    )
    _add(
        trig,
        "min_delta",
        type=float,
        default=0.0,
        metavar="D",
        help="smallest change that counts as an improvement (default: 0.0)",
    )
    _add(trig, "relative_delta", action="store_true", help="--min_delta is relative to the best value")

    rules = parser.add_argument_group("diagnosis rules")
    _add(
        rules,
        "head_metric",
        default="head_acc",
        metavar="NAME",
        help="head-class accuracy (default: head_acc)",
    )
    _add(
        rules,
        "tail_metric",
        default="tail_acc",
        metavar="NAME",
        help="tail-class accuracy (default: tail_acc)",
    )
    _add(
        rules,
        "loss_metric",
        default="loss",
        metavar="NAME",
        help="loss; `ce` stands in when there is no `loss` (default: loss)",
    )
    for name, default, text in (
        ("tail_low", 0.3, "poor_tail when tail accuracy is below"),
        ("head_high", 0.6, "... and head accuracy above"),
        ("head_low", 0.5, "poor_head when head accuracy is below"),
        ("tail_high", 0.4, "... and tail accuracy above"),
        ("loss_high", 2.0, "high_loss when the loss is above"),
    ):
        _add(rules, name, type=float, default=default, metavar="X", help=f"{text} X (default: {default})")
    _add(
        rules,
        "search_space",
        type=Path,
        default=None,
        metavar="FILE",
        help="JSON or TOML file of grids per weight (default: the seed's grid)",
    )
    _add(
        rules,
        "seed",
        type=int,
        default=None,
        metavar="N",
        help="seed of the random perturbation (default: random)",
    )
    _add(
        rules,
        "tuner",
        default=None,
        metavar="MODULE:CLASS",
        help="your AutoTuner/AdaptiveTuner subclass, e.g. my_tuner:MyTuner or ./my_tuner.py:MyTuner",
    )
    _add(
        rules,
        "strategy",
        choices=("seed", "adaptive"),
        default="adaptive",
        help="seed: the seed's rules only; adaptive: also judge each change and roll back losers "
        "(default: adaptive)",
    )

    sup = parser.add_argument_group("supervision")
    _add(
        sup,
        "max_trials",
        type=int,
        default=5,
        metavar="N",
        help="batch: number of trainings (default: 5)"
        + ("; accepted and ignored in realtime mode" if mode == "realtime" else ""),
    )
    _add(
        sup,
        "check_interval",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds between health checks of the training (default: 30.0)",
    )
    _add(
        sup,
        "stall_timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="warn when the training prints nothing for S seconds (default: 600)",
    )
    _add(
        sup,
        "grace_period",
        type=float,
        default=30.0,
        metavar="S",
        help="on Ctrl-C/SIGTERM, wait S seconds for the training to exit before killing it (default: 30)",
    )
    _add(
        sup,
        "config_file",
        type=Path,
        default=Path("/tmp/auto_tune_config.json"),
        metavar="PATH",
        help="the control file the training reads (default: /tmp/auto_tune_config.json)",
    )
    _add(
        sup,
        "ack_epochs",
        type=int,
        default=3,
        metavar="N",
        help="warn when the training has not applied a new config after N epochs (default: 3)",
    )
    _add(
        sup,
        "run_dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"where logs and summaries go (default: ./autotune_runs/<UTC time>-{mode}/)",
    )
    _add(
        sup,
        "lang",
        choices=("auto", "en", "zh"),
        default="auto",
        help="console language; auto picks zh under a zh locale (default: auto)",
    )
    _add(sup, "key_value", action="store_true", help="also parse `key=value` / `key: value` metric lines")
    _add(
        sup,
        "metric_regex",
        default=None,
        metavar="REGEX",
        help="parse metric lines with REGEX instead: named groups become metrics, `epoch` the epoch",
    )
    if mode == "batch":
        _add(
            sup,
            "stop_on_stagnation",
            action="store_true",
            help="end a trial early once it stagnates, to save GPU hours",
        )
        _add(
            sup, "write_config", action="store_true", help="also write each trial's weights to --config_file"
        )
    _add(
        sup,
        "resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue an interrupted batch in RUN_DIR without rerunning finished trials"
        if mode == "batch"
        else "continue the events log, weights and control-file versions of a supervisor that died, "
        "in RUN_DIR (see docs/reliability.md)",
    )
    parser.add_argument(
        "command",
        nargs="*",
        metavar="-- COMMAND",
        help="the training command, after `--` (instead of --base_cmd/--base_args)",
    )


def _known_options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def split_seed_args(argv: Sequence[str], known: set[str]) -> tuple[list[str], list[str]]:
    """Split the seed's ``--base_args`` form: return (tuner argv, training args).

    Everything after ``--base_args`` up to the first option that autotune-rt itself
    defines belongs to the training.
    """
    args = list(argv)
    for marker in ("--base_args", "--base-args"):
        if marker in args:
            start = args.index(marker)
            end = start + 1
            while end < len(args) and args[end].split("=", 1)[0] not in known:
                if args[end] == "--":
                    break
                end += 1
            return args[:start] + args[end:], args[start + 1 : end]
    return args, []


def _make_parser(mode: str, prog: str) -> argparse.ArgumentParser:
    description = {
        "realtime": "Supervise one training and retune its loss weights while it runs, "
        "through a control file the training re-reads every epoch.",
        "batch": "Rerun whole trainings with adjusted loss weights, up to --max_trials, "
        "and report the best configuration.",
    }[mode]
    parser = _Parser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Seed form: --base_cmd train.py --base_args <training options> <tuner options>\n"
        f"Idiomatic form: {PROG} {mode} [options] -- python train.py <training options>",
    )
    _tuning_options(parser, mode)
    return parser


def parse_settings(mode: str, argv: Sequence[str], prog: str) -> Settings:
    """Parse *argv* of a realtime/batch command line into validated Settings."""
    parser = _make_parser(mode, prog)
    argv = list(argv)
    command_after_dashdash: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command_after_dashdash = argv[:cut], argv[cut + 1 :]
    tuner_argv, base_args = split_seed_args(argv, _known_options(parser))
    ns = parser.parse_args(tuner_argv)
    if ns.command:
        raise ConfigError(f"unexpected argument {ns.command[0]!r}; put the training command after `--`")
    if ns.base_cmd and command_after_dashdash:
        raise ConfigError("give the training either as --base_cmd/--base_args or after `--`, not both")
    if ns.base_cmd:
        command = build_command(ns.base_cmd, base_args)
    elif command_after_dashdash:
        first = command_after_dashdash[0]
        command = (
            build_command(first, command_after_dashdash[1:])
            if first.endswith(".py")
            else command_after_dashdash
        )
    else:
        raise ConfigError(
            f"no training command: pass --base_cmd train.py --base_args ... "
            f"or `{prog} [options] -- python train.py`"
        )
    weights = {
        "lambda_dol": ns.lambda_dol,
        "lambda_col": ns.lambda_col,
        "lambda_hier": ns.lambda_hier,
        "lambda_scl": ns.lambda_scl,
        "max_grad_norm": 1.0 if ns.max_grad_norm is None else ns.max_grad_norm,
    }
    settings = Settings(
        command=command,
        weights=weights,
        mode_name=mode,  # type: ignore[arg-type]
        min_epochs=ns.min_epochs,
        patience=ns.patience,
        cooldown=ns.cooldown,
        max_adjustments=ns.max_adjustments,
        max_trials=ns.max_trials,
        check_interval=ns.check_interval,
        stall_timeout=ns.stall_timeout,
        grace_period=ns.grace_period,
        ack_epochs=ns.ack_epochs,
        config_file=ns.config_file,
        write_config=(mode == "realtime" or ns.write_config),
        run_dir=ns.run_dir,
        metric=ns.metric,
        mode=ns.mode,
        min_delta=ns.min_delta,
        relative_delta=ns.relative_delta,
        names=MetricNames(head=ns.head_metric, tail=ns.tail_metric, loss=ns.loss_metric),
        thresholds=Thresholds(
            tail_low=ns.tail_low,
            head_high=ns.head_high,
            head_low=ns.head_low,
            tail_high=ns.tail_high,
            loss_high=ns.loss_high,
        ),
        search_space=ns.search_space,
        seed=ns.seed,
        tuner=ns.tuner,
        strategy=ns.strategy,
        lang=detect_lang(ns.lang),
        key_value=ns.key_value,
        metric_regex=ns.metric_regex,
        stop_on_stagnation=getattr(ns, "stop_on_stagnation", False),
        resume=ns.resume,
        max_grad_norm_set=ns.max_grad_norm is not None,
    )
    settings.validate()
    if settings.search_space is not None:
        from autotune_rt.space import load_search_space

        load_search_space(settings.search_space)  # a bad file is a usage error before anything starts
    if settings.tuner is not None:
        from autotune_rt.tuner import load_tuner_class

        load_tuner_class(settings.tuner)
    if settings.metric_regex is not None:
        from autotune_rt.parse import LineParser

        LineParser(pattern=settings.metric_regex)
    check_command(settings.command)
    return settings


def _run_mode(mode: str, argv: Sequence[str], prog: str) -> int:
    settings = parse_settings(mode, argv, prog)
    if mode == "realtime":
        from autotune_rt.supervisor import run_realtime

        return run_realtime(settings)
    from autotune_rt.batch import run_batch

    return run_batch(settings)


def _top_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Tune a training's loss weights while it runs.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    sub.add_parser("realtime", help="supervise one training and retune it while it runs", add_help=False)
    sub.add_parser("batch", help="rerun whole trainings with adjusted weights", add_help=False)
    sub.add_parser("demo", help="run the bundled demo training under the tuner", add_help=False)
    sub.add_parser("status", help="how a run is going, at a glance", add_help=False)
    sub.add_parser("report", help="plot a run to report.png / report.html", add_help=False)
    sub.add_parser("tail", help="follow a run's events.jsonl as readable lines", add_help=False)
    return parser


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser = _top_parser()
        if not argv:
            parser.print_help()
            return USAGE_ERROR
        parser.parse_args(argv)
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("realtime", "batch"):
        return _run_mode(command, rest, f"{PROG} {command}")
    if command == "demo":
        from autotune_rt.demo.run import demo_main

        return demo_main(rest)
    if command in ("status", "report", "tail"):
        from autotune_rt.views import views_main

        return views_main(command, rest)
    raise ConfigError(
        f"unknown command {command!r}; choose one of realtime, batch, demo, status, report, tail"
    )


def _guard(func: object, argv: list[str], prog: str) -> int:
    try:
        return int(func(argv))  # type: ignore[operator]
    except (ConfigError, LaunchError, AutotuneError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130
    finally:
        for stream in (sys.stdout, sys.stderr):  # a closed pipe must not turn the exit code into 120
            try:
                stream.flush()
            except (OSError, ValueError):
                silence(stream)


def main(argv: Sequence[str] | None = None) -> int:
    """``autotune-rt COMMAND ...``"""
    args = list(sys.argv[1:] if argv is None else argv)
    return _guard(_dispatch, args, PROG)


def realtime_main(argv: Sequence[str] | None = None) -> int:
    """``auto_tune_realtime`` / ``scripts/auto_tune_realtime.py``: the seed's realtime command."""
    args = list(sys.argv[1:] if argv is None else argv)
    return _guard(lambda a: _run_mode("realtime", a, "auto_tune_realtime"), args, "auto_tune_realtime")


def batch_main(argv: Sequence[str] | None = None) -> int:
    """``auto_tune`` / ``scripts/auto_tune.py``: the seed's batch command."""
    args = list(sys.argv[1:] if argv is None else argv)
    return _guard(lambda a: _run_mode("batch", a, "auto_tune"), args, "auto_tune")
