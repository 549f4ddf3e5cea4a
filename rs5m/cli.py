"""The `rs5m` command: run the pipeline from a config (or check it, or plan the run), print the funnel and
the runs of a work directory, run the offline demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rs5m.config import ConfigError, PipelineConfig, load_config
from rs5m.detector_cli import add_train_detector_parser
from rs5m.eval_cli import add_eval_parser
from rs5m.verbosity import set_verbose

if TYPE_CHECKING:
    from storage.layout import Layout

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _stage_list(text: str) -> list[str]:
    from tasks.pipeline import STAGE_ORDER  # every pipeline's stages

    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGE_ORDER]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGE_ORDER)}"
        )
    return stages


# Exit statuses: 0 done, 1 the run failed (work so far kept), 2 bad input (config, paths), 3 the work
# directory is being written by another run; 128 + N when stopped by signal N (130 Ctrl-C, 143 SIGTERM;
# 141 when the reader of its output went away: `rs5m report W | head`).
EXIT_BUSY = 3
EXIT_BROKEN_PIPE = 141


def run_pipeline(
    config: PipelineConfig,
    stages: list[str] | None,
    wait: bool = False,
    pipelines: list[str] | None = None,
) -> int:
    import os

    from flows.pipelines import rs5m_flow
    from rs5m.report import funnel_markdown, load_funnel
    from storage.layout import Layout
    from storage.lock import workdir_lock
    from tasks.pipeline import check_config

    # a bad model, detector or eval folder fails here, before any stage runs
    check_config(config, stages, pipelines)
    layout = Layout(config.workdir)
    # taken here too (the flow takes it again), so a busy work directory is one line and no Prefect run
    with workdir_lock(layout, f"starting (rs5m pid {os.getpid()})", wait=wait, on_wait=_say):
        state = rs5m_flow(
            config=config, pipelines=pipelines, stages=stages, wait_for_lock=wait, return_state=True
        )
    if state.is_completed() or state.is_failed():
        # the funnel so far, on stdout; the flow's own print of it is a log line (log_prints), which a
        # run that is not verbose keeps off the terminal
        print(funnel_markdown(load_funnel(layout), str(layout.root)))
    if state.is_completed():
        return 0
    print(f"\nrun {state.name.lower()}: {state.message}", file=sys.stderr)
    print(f"Work done so far is kept in {config.workdir}; rerun the same command to resume.", file=sys.stderr)
    return 1


def _say(message: str) -> None:
    print(f"rs5m: {message}", file=sys.stderr, flush=True)


def _selection(args: argparse.Namespace) -> tuple[PipelineConfig, list[str] | None]:
    """The config (with --workdir) and the pipelines --pipeline selects (None: every one the config has)."""
    config = load_config(args.config)
    if args.workdir:
        config = config.model_copy(update={"workdir": Path(args.workdir).resolve()})
    if args.pipeline and args.pipeline != "release":
        configured = {"pub11": bool(config.sources), "rs3": config.rs3 is not None}
        if not configured[args.pipeline]:
            raise ConfigError(f"--pipeline {args.pipeline}: the config has no {args.pipeline} sources")
    pipelines = None if args.pipeline is None else ([] if args.pipeline == "release" else [args.pipeline])
    return config, pipelines


def cmd_run(args: argparse.Namespace) -> int:
    set_verbose(args.verbose)  # before anything imports Prefect, which reads its console level then
    config, pipelines = _selection(args)
    if args.dry_run:
        return dry_run(config, args, pipelines)
    if args.json:
        raise ConfigError("--json goes with --dry-run (a run prints its progress, then the funnel)")
    return run_pipeline(config, args.stages, wait=args.wait, pipelines=pipelines)


def _writer(config: PipelineConfig) -> dict | None:
    """Who holds the work directory's lock now (None: nobody), without taking it."""
    from storage.layout import Layout
    from storage.lock import is_held, read_holder

    layout = Layout(config.workdir)
    if not layout.root.is_dir() or not is_held(layout):
        return None
    return read_holder(layout) or {"run_id": None, "note": "no holder record"}


def dry_run(config: PipelineConfig, args: argparse.Namespace, pipelines: list[str] | None) -> int:
    """What `rs5m run` would run and what is current (rs5m/plan.py): checks the config as the run does,
    then reads the work directory; takes no lock and writes nothing there."""
    from rs5m.plan import plan_json, plan_run, plan_text
    from tasks.pipeline import check_config

    check_config(config, args.stages, pipelines)
    plans = plan_run(config, pipelines, args.stages)
    data = plan_json(config, plans, _writer(config))
    print(json.dumps(data, indent=2) if args.json else plan_text(args.config, plans, data))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """The checks `rs5m run` makes before it starts (the config, the selection, every selected stage's
    models, files and devices), alone: exit 0 when the run could start, 2 with the reason when not."""
    from rs5m.terminal import wrapped
    from tasks.pipeline import check_config, selected_stages

    config, pipelines = _selection(args)
    check_config(config, args.stages, pipelines)
    names = [stage.name for stage in selected_stages(config, pipelines, args.stages)]
    lines = wrapped(f"{args.config}: OK, a run could start (work directory {config.workdir})")
    lines += wrapped(f"  checked {len(names)} stage{'s' * (len(names) != 1)}: {', '.join(names)}")
    writer = _writer(config)
    if writer is not None:
        lines += wrapped(
            f"  note: run {writer.get('run_id')} is writing the work directory now (a run would wait for it "
            "with --wait, or exit 3)"
        )
    print("\n".join(lines))
    return 0


def _existing_workdir(path: str, command: str) -> Layout | None:
    """The work directory's Layout, or None after saying on stderr that there is none at `path`."""
    from storage.layout import Layout

    layout = Layout(Path(path))
    if not layout.root.is_dir():
        print(f"rs5m {command}: no work directory at {layout.root}", file=sys.stderr)
        return None
    return layout


def cmd_status(args: argparse.Namespace) -> int:
    from rs5m.status import status_text, workdir_status

    layout = _existing_workdir(args.workdir, "status")
    if layout is None:
        return 2
    status = workdir_status(layout)
    if not status["runs"] and status["writer"] is None and not layout.runs.is_dir():
        print(f"rs5m status: no runs recorded in {layout.root} (not a work directory?)", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=2) if args.json else status_text(status, show_all=args.all))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    set_verbose(args.verbose)  # before anything imports Prefect, which reads its console level then
    config = load_config(args.config)
    if args.workdir:
        config = config.model_copy(update={"workdir": Path(args.workdir).resolve()})
    if config.train is None:
        raise ConfigError(f"{args.config} has no `train:` section (see configs/train_rs5m_retrieval.yaml)")
    if args.evaluate and config.eval is None:
        raise ConfigError(f"--evaluate: {args.config} has no `eval:` section naming the datasets")
    return run_training(config, evaluate=args.evaluate, wait=args.wait)


def run_training(config: PipelineConfig, evaluate: bool, wait: bool = False) -> int:
    """The `train` (or `train_and_evaluate`) flow over the config's `train:` section, under the work
    directory's lock: the release it reads must not be replaced (and the old one deleted) while it trains."""
    import os

    from flows.train import scorecard_text, train_and_evaluate_flow, train_flow
    from models.train import TrainingInputError, check_training_inputs
    from storage.layout import Layout
    from storage.lock import workdir_lock

    try:
        check_training_inputs(config.train, config.workdir)  # before Prefect starts or a process launches
    except TrainingInputError as error:
        print(f"rs5m train: {error}", file=sys.stderr)
        return 2
    with workdir_lock(Layout(config.workdir), f"train (rs5m pid {os.getpid()})", wait=wait, on_wait=_say):
        chosen = train_and_evaluate_flow if evaluate else train_flow
        state = chosen(config=config, return_state=True)
    if state.is_completed():
        if evaluate:  # on stdout: the flow's own print of it is a log line, off the terminal unless verbose
            print("\n" + scorecard_text(state.result()))
        return 0
    print(f"\ntraining {state.name.lower()}: {state.message}", file=sys.stderr)
    print("Checkpoints so far are kept; rerun the same command to resume.", file=sys.stderr)
    return 1


def cmd_prune(args: argparse.Namespace) -> int:
    from storage.lock import workdir_lock
    from storage.prune import apply_prune, plan_prune

    layout = _existing_workdir(args.workdir, "prune")
    if layout is None:
        return 2
    with workdir_lock(layout, "prune", wait=False):
        plan = plan_prune(layout)
        for group, (entries, size) in sorted(plan.by_group.items()):
            print(f"  {group}: {entries} entries, {_human(size)}")
        for stage in plan.skipped_stages:
            print(f"  {stage}: left alone (not complete: its files may be what a rerun resumes from)")
        if not plan.paths:
            print(f"nothing to prune in {layout.root}")
            return 0
        if not args.yes:
            print(f"would delete {len(plan.paths)} entries, {_human(plan.bytes)}; rerun with --yes to delete")
            return 0
        apply_prune(plan)
        print(f"deleted {len(plan.paths)} entries, {_human(plan.bytes)}")
    return 0


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def cmd_report(args: argparse.Namespace) -> int:
    from rs5m.report import funnel_text, load_funnel
    from storage.layout import Layout

    layout = Layout(Path(args.workdir))
    if not layout.catalog.exists() and not any(layout.root.glob("*/manifest.json")):
        print(f"no pipeline output in {layout.root}: run the pipeline there first", file=sys.stderr)
        return 2
    report = load_funnel(layout)
    print(json.dumps(report.to_json(), indent=2) if args.json else funnel_text(report))
    if args.html:
        from rs5m.figures import report_html, report_sections
        from storage.atomic import write_text

        write_text(Path(args.html), report_html(report_sections(layout, report), str(layout.root)))
        # stderr: stdout stays the funnel alone (--json output stays parseable)
        print(f"report with pictures: {args.html}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    set_verbose(args.verbose)  # before anything imports Prefect, which reads its console level then
    import yaml

    from rs5m.config import parse_config
    from rs5m.demo import DemoServer, write_demo_eval_set, write_demo_heldout_sets, write_demo_sources
    from rs5m.demo_rs3 import write_demo_rs3
    from storage.atomic import write_text
    from storage.layout import Layout

    workdir = Path(args.workdir).resolve()
    layout = Layout(workdir)
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["workdir"] = str(workdir)
    config = parse_config(data, origin=str(DEMO_CONFIG), base_dir=workdir)
    with DemoServer(port=args.port) as server:
        print(f"demo corpus served at {server.base_url}")
        write_demo_sources(layout.demo_sources(), server.base_url)
        write_demo_eval_set(layout.root / "demo_eval")
        write_demo_rs3(layout.root / "demo_rs3")
        write_demo_heldout_sets(layout.root / "demo_heldout")
        # the resolved config, so single stages can be rerun by hand: rs5m run WORKDIR/demo-config.yaml
        write_text(
            layout.root / "demo-config.yaml", yaml.safe_dump(config.model_dump(mode="json", by_alias=True))
        )
        code = run_pipeline(config, None)
    if code == 0:  # GeoRSCLIP on the demo's own release: a short fine-tune, then the scorecard
        code = run_training(config, evaluate=True)
    print(
        "\nThe demo's images are synthetic: web pairs served on loopback (PUB11), and label-only sets in the\n"
        "fMoW, BigEarthNet v1 and image-folder layouts under demo_rs3/ (RS3).\n"
        f"Outputs in {workdir}:\n"
        f"  dataset/            the release: Parquet per split, its card (README.md) and manifest.json\n"
        f"  webdataset/         the same samples as WebDataset tars, with sizes.json (open_clip_train)\n"
        f"  catalog.duckdb      DuckDB views: samples, ledger, funnel, stages (open it read-only)\n"
        f"  <stage>/data/       survivors per shard (Parquet); <stage>/ledger/ fates per shard\n"
        f"  train/{config.train.run_name}/    checkpoints, metrics.jsonl, loss.svg, scorecard.json\n"
        f"  funnel again:       rs5m report {workdir}"
    )
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rs5m", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the pipeline (or some stages) from a YAML config")
    run.add_argument("config", help="pipeline config YAML (see configs/demo.yaml and the README)")
    run.add_argument(
        "--stages", type=_stage_list, help="comma-separated stages to run, e.g. keyword,download"
    )
    run.add_argument("--workdir", help="override the config's workdir")
    run.add_argument(
        "--pipeline",
        choices=["pub11", "rs3", "release"],
        help="run only this data pipeline (then the release over every pipeline the config has), or only "
        "the release; default: every pipeline the config has, then the release",
    )
    run.add_argument(
        "--wait",
        action="store_true",
        help="if another run is writing the work directory, wait for it (default: fail at once, exit 3)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="run nothing: check the config, then print per stage how many units are current and how many "
        "would run (no lock taken, nothing written)",
    )
    run.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    _add_verbose(run)
    run.set_defaults(handler=cmd_run)

    check = commands.add_parser(
        "check",
        help="check a config as `rs5m run` does before starting (models, files, devices); run nothing",
    )
    check.add_argument("config", help="pipeline config YAML")
    check.add_argument("--stages", type=_stage_list, help="check only these stages (as `rs5m run --stages`)")
    check.add_argument("--workdir", help="override the config's workdir")
    check.add_argument("--pipeline", choices=["pub11", "rs3", "release"], help="as `rs5m run --pipeline`")
    check.set_defaults(handler=cmd_check)

    train = commands.add_parser(
        "train", help="fine-tune an open_clip model as the config's `train:` section says (GeoRSCLIP)"
    )
    train.add_argument("config", help="YAML with a `train:` section (configs/train_rs5m_retrieval.yaml)")
    train.add_argument("--workdir", help="override the config's workdir")
    train.add_argument(
        "--evaluate",
        action="store_true",
        help="then evaluate the base model and every checkpoint on the `eval:` datasets (a scorecard)",
    )
    train.add_argument("--wait", action="store_true", help="wait for a run writing the work directory")
    _add_verbose(train)
    train.set_defaults(handler=cmd_train)

    prune = commands.add_parser(
        "prune",
        help="delete files no current manifest names (sources left out, stale shards, old releases)",
    )
    prune.add_argument("workdir")
    prune.add_argument("--yes", action="store_true", help="delete (default: only print what would go)")
    prune.set_defaults(handler=cmd_prune)

    report = commands.add_parser("report", help="print the funnel of a work directory")
    report.add_argument("workdir")
    report.add_argument("--json", action="store_true", help="machine-readable funnel")
    report.add_argument(
        "--html", metavar="FILE", help="also write the report with pictures as one self-contained HTML file"
    )
    report.set_defaults(handler=cmd_report)

    status = commands.add_parser(
        "status",
        help="the runs of a work directory (running, completed, failed, interrupted) and its writer now",
    )
    status.add_argument("workdir")
    status.add_argument("--json", action="store_true", help="machine-readable (every run)")
    status.add_argument("--all", action="store_true", help="every run (default: the newest 10)")
    status.set_defaults(handler=cmd_status)

    add_train_detector_parser(commands)
    add_eval_parser(commands)

    demo = commands.add_parser(
        "demo", help="build a synthetic corpus, serve it on loopback, run the pipeline"
    )
    demo.add_argument("--workdir", default="rs5m-demo", help="where the demo writes (default: ./rs5m-demo)")
    demo.add_argument(
        "--port", type=int, default=0, help="loopback port of the corpus server (default: any free port)"
    )
    _add_verbose(demo)
    demo.set_defaults(handler=cmd_demo)
    return parser


def _add_verbose(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--verbose",
        action="store_true",
        help="also show Prefect's log lines (task runs created, finished, each training step) and "
        "img2dataset's output (default: a progress line per stage and for training, warnings and errors, "
        "then the funnel or the scorecard)",
    )


def main(argv: list[str] | None = None) -> int:
    """The command's exit status. Output into a pipe whose reader went away (`rs5m report W | head`) ends
    the command quietly with 141, as a process killed by SIGPIPE would, and not with a traceback."""
    try:
        try:
            return _main(argv)
        finally:  # also after --help: a closed pipe fails here, not in the interpreter's exit
            sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_reader_gone():  # another pipe or socket broke: a real error, with its traceback
            raise
        _drop_stdout()
        return EXIT_BROKEN_PIPE


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports an error on its writing end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll, or no file descriptor behind sys.stdout
        return False


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at interpreter exit has nowhere to fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _main(argv: list[str] | None) -> int:
    from storage.atomic import DiskFullError
    from storage.lock import WorkdirBusyError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"rs5m: {error}", file=sys.stderr)
        return 2
    except WorkdirBusyError as error:
        print(f"rs5m: {error}", file=sys.stderr)
        return EXIT_BUSY
    except DiskFullError as error:
        print(f"rs5m: {error.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the run's own handling is in place (flows/run_control.py)
        print("rs5m: interrupted; nothing was left half-written, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
