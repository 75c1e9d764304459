"""The `moe-ray` console script: a thin layer over `moe_ray.api`.

Every `run` flag is a spec field (generated from `moe_ray.spec.Spec`), so a TOML spec and the
command line say the same things. Errors print as one line, `moe-ray: error: ...`, exit status 2
(`explain_error`); `--debug` or MOE_RAY_DEBUG=1 prints the traceback too.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import traceback
import typing
from collections.abc import Callable, Sequence

from . import __version__
from .errors import MoeRayError, SpecError
from .interrupt import emit, exit_status, handling_signals, progress_line
from .spec import Spec, set_path, spec_fields

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Command, str]] = {}


def command(name: str, help: str):
    """Register a subcommand: the decorated function adds its arguments; `run` is its body."""
    def wrap(add_args):
        def register(body: Command) -> Command:
            COMMANDS[name] = (add_args, body, help)
            return body
        return register
    return wrap


def _flag(dotted: str, field) -> str:
    """A spec field's flag: the last component of its name, unless the field names its own (where two
    groups would otherwise share one: `dynamic.device` is `--dynamic-device`, `device` is `--device`)."""
    return "--" + field.metadata.get("flag", dotted.rsplit(".", 1)[-1].replace("_", "-"))


RUN_GROUPS: dict[str, str] = {
    "spec": "what to analyse and where the results go",
    "analyses": "which analyses, on which layers",
    "static": "static analyses (weights): S1-S3, S5, S6",
    "reorder": "reorder analysis (S4 neuron reordering)",
    "dynamic": "dynamic analyses (text through the model): D1-D5",
    "causal": "causal checks (beyond the paper)",
    "resources": "what each task asks of Ray, and the device",
    "cluster": "which Ray runs the job",
}
"""The titles of `run --help`'s flag groups, in order."""
FIELD_GROUPS: dict[str, str] = {
    "analyses": "analyses", "layers": "analyses", "mtp": "analyses", "device": "resources",
    "address": "cluster", "resources.num_cpus": "cluster", "resources.object_store_memory_gb": "cluster",
    "resources.check_fit": "cluster", "resources.entrypoint_num_cpus": "cluster",
    "resources.entrypoint_memory_gb": "cluster",
}
"""A spec field's group where it is not its section (`static.*` is static); others are `spec`."""


def field_group(dotted: str) -> str:
    """The `run --help` group of a spec field."""
    section = dotted.split(".", 1)[0] if "." in dotted else ""
    return FIELD_GROUPS.get(dotted) or (section if section in RUN_GROUPS else "spec")


def field_default(field) -> typing.Any:
    """A spec field's default (the dataclass's, from default_factory where it has one)."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _shown(value: typing.Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def add_spec_flags(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """One flag per spec field (`--dbscan-eps` sets `static.dbscan_eps`), in `RUN_GROUPS`, each
    help saying its default and choices (from the field's metadata: one place). Returns the groups."""
    groups = {name: parser.add_argument_group(name, title) for name, title in RUN_GROUPS.items()}
    for dotted, hint, field in spec_fields():
        flag = _flag(dotted, field)
        choices = field.metadata.get("choices")
        default = field_default(field)
        help_text = field.metadata.get("help", "").replace("%", "%%")
        if default is not None and default != "":
            help_text += f" (default: {_shown(default)})"
        help_text += f" [spec: {dotted}]"
        base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        group = groups[field_group(dotted)]
        if base[0] is bool:
            group.add_argument(flag, dest=dotted, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            many = list in (typing.get_origin(hint), *map(typing.get_origin, typing.get_args(hint)))
            metavar = ("{" + ",".join(choices) + "}" + (",..." if many else "")) if choices else \
                dotted.rsplit(".", 1)[-1].upper()
            group.add_argument(flag, dest=dotted, default=None, metavar=metavar, help=help_text)
    return groups


def spec_from_args(args: argparse.Namespace) -> Spec:
    """The spec file (if any) with every given flag applied on top."""
    spec = Spec.from_toml(args.spec) if args.spec else Spec()
    data = spec.to_dict()
    for dotted, _, _ in spec_fields():
        value = getattr(args, dotted, None)
        if value is not None:
            set_path(data, dotted, value)
    return Spec.from_dict(data)


def _add_run(p: argparse.ArgumentParser) -> None:
    groups = add_spec_flags(p)
    groups["spec"].add_argument("spec_file", nargs="?", help="job spec (TOML); flags override its fields")
    groups["spec"].add_argument("--spec", dest="spec_opt", help="job spec (TOML), same as the positional argument")


@command("run", "run analyses on a checkpoint into a Zarr store")(_add_run)
def _run(args: argparse.Namespace) -> int:
    if args.spec_opt and args.spec_file:
        raise SpecError(f"two specs given, {args.spec_file} and --spec {args.spec_opt}; give one")
    args.spec = args.spec_opt or args.spec_file
    spec = spec_from_args(args)
    spec.validate()  # a bad value is refused before torch and Ray are imported
    from .api import run

    run(spec)
    return 0


TINY_FAMILIES = ("mixtral", "grok1", "deepseek_v3", "deepseek_v2", "deepseek_moe", "gpt_oss", "llama4", "qwen2_moe",
                 "qwen3_moe", "olmoe", "llama4_text")
"""The MoE families of moe_ray.checkpoint.FAMILIES, and below make-tiny's variants, spelled out so that
building the parser (every command, --help included) does not import torch."""
TINY_VARIANTS = ("scratch", "upcycled", "permuted")


def _add_make_tiny(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", required=True, choices=TINY_FAMILIES)
    p.add_argument("--variant", required=True, choices=TINY_VARIANTS)
    p.add_argument("--out", required=True, help="directory to write the checkpoint into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sigma", type=float, default=0.5, help="upcycled: relative noise added to the parent")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--shape", default=None, metavar="FAMILY:FLAVOR",
                   help="the depth and expert counts of a real model at tiny width, e.g. mixtral:8x7B "
                        "(32 layers x 8 experts), deepseek_moe:16B, grok1:314B")


@command("make-tiny", "build a tiny test checkpoint in the real hub layout")(_add_make_tiny)
def _make_tiny(args: argparse.Namespace) -> int:
    from .checkpoint.tiny import make_tiny, shape_overrides

    overrides = shape_overrides(args.family, args.shape) if args.shape else None
    tiny = make_tiny(args.family, args.variant, args.out, seed=args.seed, sigma=args.sigma,
                     dtype=args.dtype, overwrite=args.overwrite, config_overrides=overrides)
    print(f"wrote {args.family} ({args.variant}) to {tiny.path}")
    if tiny.reference:
        print(f"wrote its dense parent to {tiny.reference} (use it as --reference)")
    return 0


# ---- Ray jobs: submit, status, logs, stop, list (moe_ray.service) ------------------------------

def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Ray job server, http://HEAD:8265 (default: "
                   "$RAY_API_SERVER_ADDRESS, an http $RAY_ADDRESS, or http://127.0.0.1:8265)")


def _add_submit(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec_file", help="job spec (TOML); paths in it as the cluster sees them")
    _add_address(p)
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=False,
                   help="follow the job's log until it ends, then exit 0 if it succeeded (default: return "
                        "once it is submitted; `moe-ray logs ID -f` follows it later)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip opening the checkpoints here (for paths only the cluster can read)")
    p.add_argument("--no-check-fit", dest="check_fit", action="store_false",
                   help="submit even if no node of the cluster as it is now could hold the work "
                        "(for clusters that add nodes on demand) [spec: resources.check_fit]")
    p.add_argument("--runtime-env", metavar="FILE", help="a Ray runtime_env (YAML or JSON) for the job, merged "
                   "with moe-ray's own: its env_vars win, its py_modules are added, its other fields kept")
    p.add_argument("--ship-package", action="store_true",
                   help="development: send this moe_ray with the job (runtime_env py_modules) instead of "
                        "running the cluster's installed moe-ray (which must be this version)")


@command("submit", "submit a spec as a Ray job to a cluster's job server")(_add_submit)
def _submit(args: argparse.Namespace) -> int:
    spec = Spec.from_toml(args.spec_file)
    spec.resources.check_fit = spec.resources.check_fit and args.check_fit
    spec.validate()  # a bad value is refused before torch and Ray are imported
    from .service import load_runtime_env, submit

    runtime_env = load_runtime_env(args.runtime_env) if args.runtime_env else None
    handle = args.submitted = submit(spec, args.address, check_checkpoint=args.check, runtime_env=runtime_env,
                                     ship_package=args.ship_package)
    print(f"moe-ray: submitted job {handle.id} to {handle.address}")
    if not args.wait:
        where = f" --address {args.address}" if args.address else ""  # the same server the next command asks
        print(f"moe-ray: follow it with `moe-ray logs {handle.id} -f{where}`")
        return 0
    handle.follow()
    status = handle.wait(progress=False)  # the log it followed has the progress lines
    print(f"moe-ray: {status.line()}")
    return 0 if status.state == "SUCCEEDED" else 1


def _add_job_id(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_id", help="the id `moe-ray submit` printed (raysubmit_...)")
    _add_address(p)


@command("status", "a submitted job's state and units done per analysis")(_add_job_id)
def _status(args: argparse.Namespace) -> int:
    from .service import JobHandle

    print(JobHandle(args.job_id, args.address).status().line())
    return 0


def _add_logs(p: argparse.ArgumentParser) -> None:
    _add_job_id(p)
    p.add_argument("-f", "--follow", action="store_true", help="keep streaming until the job ends")


@command("logs", "a submitted job's log")(_add_logs)
def _logs(args: argparse.Namespace) -> int:
    from .service import JobHandle

    handle = JobHandle(args.job_id, args.address)
    if args.follow:
        handle.follow()
    else:
        print(handle.logs(), end="")
    return 0


@command("stop", "stop a submitted job (finished units stay; resubmit to resume)")(_add_job_id)
def _stop(args: argparse.Namespace) -> int:
    from .service import JobHandle

    handle = JobHandle(args.job_id, args.address)
    stopped = handle.stop()
    print(f"moe-ray: {'stopping' if stopped else 'already ended:'} {handle.status().line()}")
    return 0


@command("list", "the moe-ray jobs a cluster's job server knows")(_add_address)
def _list(args: argparse.Namespace) -> int:
    from .service import jobs

    for status in jobs(args.address):
        print(f"{status.line()}  store {status.store}")
    return 0


def _add_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint directory, config.json, or a flavor (mixtral:8x7B, deepseek_moe:16B, grok1:314B)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--nodes", type=int, default=None, help="nodes you have (checked against what is needed)")
    p.add_argument("--cores-per-node", type=int, default=64, help="CPU cores per node (for the time estimate)")


@command("plan", "size a model from its config alone: bytes, shards, GPUs, nodes, store, LAPs")(_add_plan)
def _plan(args: argparse.Namespace) -> int:
    from .planning import plan_model

    print(plan_model(args.model, args.gpus_per_node, args.gpu_mem, args.nodes, args.cores_per_node).report())
    return 0


PLOT_PARALLEL = ("auto", "ray", "processes", "none")
"""moe_ray.plotting.report.PARALLEL, spelled out so the CLI does not import matplotlib to build its parser."""


def _add_plot(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", help="results stores (several: one after another, each its own colour scale)")
    p.add_argument("--out", required=True, help="directory for index.html, figures/ and tables/")
    p.add_argument("--parallel", choices=PLOT_PARALLEL, default="auto",
                   help="draw figures as Ray tasks, in a process pool, or one by one (auto: Ray on a cluster "
                        "of more CPUs than this machine's, else processes when more than one CPU is idle)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress of the figures (the summary line is printed either way)")
    p.add_argument("--shared-scale", action="store_true",
                   help="one colour range across all stores' images of a figure (default: each model its own, "
                        "as in the paper)")
    p.add_argument("--tokens", default=None,
                   help="token positions Figs 2, 4, 5 and 10 draw, e.g. 0-6 or 0,3,10-12, or all (default: each "
                        "figure's first tokens)")


@command("plot", "render the paper's figures and tables from one or several stores")(_add_plot)
def _plot(args: argparse.Namespace) -> int:
    from .plotting import render
    from .progress import Callback

    figures = Callback("report figures", "drawing task", args.progress)
    try:
        report = render(args.stores, args.out, args.parallel, args.shared_scale, args.tokens, on_figure=figures)
    finally:
        figures.close()
    print(report.summary())
    return 0


DEBUG_ENV = "MOE_RAY_DEBUG"
DEBUG_HELP = f"on an error, print the traceback too (or set {DEBUG_ENV}=1)"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line, `moe-ray: error: ...` and exit 2, like
    every other error (no usage block); the line points to the command's --help."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"moe-ray: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="moe-ray", description="Look inside Mixture-of-Experts LLMs, on Ray.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("--version", action="version", version=f"moe-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for name, (add_args, body, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        p.set_defaults(_body=body)
    return parser


def interruption_line(args: argparse.Namespace, argv: Sequence[str]) -> Callable[[str], str]:
    """What SIGINT/SIGTERM print, by command: for `run`, what finished and what did not (from the
    store) and the command that resumes; for `submit --wait`, that the job goes on and how to reach it."""
    def describe(signame: str) -> str:
        if args.command == "run":
            args.spec = args.spec_opt or args.spec_file
            spec = spec_from_args(args)
            return progress_line(signame, spec.store, "moe-ray " + shlex.join(argv), spec.analyses)
        job = getattr(args, "submitted", None)
        if job is not None:
            where = f" --address {args.address}" if args.address else ""
            return (f"moe-ray: interrupted by {signame}; job {job.id} keeps running: `moe-ray logs {job.id} "
                    f"-f{where}` to follow it again, `moe-ray stop {job.id}{where}` to stop it")
        return f"moe-ray: interrupted by {signame}"

    return describe


def explain_error(exc: BaseException, args: argparse.Namespace) -> tuple[str, int]:
    """What went wrong, as one line, and the exit status: 2 for what moe-ray can explain (bad input,
    storage that cannot be reached or written, a cluster or job server that cannot be reached or
    refuses, a damaged store), 1 for anything else (a bug: the line names the exception, where in
    moe-ray it happened, and how to see the traceback). A store is called damaged only when it exists
    and its own metadata or chunks fail to read (`store.find_damage`)."""
    if isinstance(exc, MoeRayError):
        return str(exc), 2
    stores = list(getattr(args, "stores", None) or [])
    if getattr(args, "command", None) == "run":
        try:
            stores.append(spec_from_args(args).store)
        except MoeRayError:
            pass
    for store in stores:
        from .store import find_damage

        try:
            damage = find_damage(store)
        except Exception:
            damage = None
        if damage:
            return (f"store {store} is damaged: {damage}; compute it again into a new store (or with "
                    "--overwrite)"), 2
    if isinstance(exc, OSError) and exc.errno is not None:  # the machine's doing (a full disk, a lost mount)
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{type(exc).__name__}{_where(exc)}: {os.strerror(exc.errno)}{where}", 2
    text = str(exc).strip().splitlines()
    return (f"unexpected {type(exc).__name__}{_where(exc)}: {text[0] if text else ''} (a bug in moe-ray? rerun "
            f"with --debug or {DEBUG_ENV}=1 for the traceback and report it)"), 1


def _where(exc: BaseException) -> str:
    """` at moe_ray/<file>:<line>`, the innermost frame of moe-ray's own code the exception passed
    through (`` if none did)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if os.path.abspath(f.filename).startswith(package + os.sep)]
    if not frames:
        return ""
    frame = frames[-1]
    rel = os.path.relpath(os.path.abspath(frame.filename), os.path.dirname(package))
    return f" at {rel}:{frame.lineno}"


def report_error(exc: BaseException, args: argparse.Namespace) -> int:
    """Print `exc` as one `moe-ray: error:` line (after its traceback with --debug); the exit status."""
    if getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
        traceback.print_exception(exc)
    message, status = explain_error(exc, args)
    print(f"moe-ray: error: {' '.join(message.split())}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        with handling_signals(interruption_line(args, argv)):
            return args._body(args)
    except KeyboardInterrupt:  # SIGINT or SIGTERM (moe_ray.interrupt)
        emit()  # the line describing it, taken when the signal came
        return exit_status()
    except Exception as exc:
        return report_error(exc, args)


if __name__ == "__main__":
    sys.exit(main())
