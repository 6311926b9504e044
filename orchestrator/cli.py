"""The command line: parses arguments, calls the rooms, renders with rich. No logic of its own."""

from __future__ import annotations

import copy
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, cast

import typer

from orchestrator.errors import OrchestratorError
from orchestrator.journal import FINAL_STATUSES as FINAL
from orchestrator.journal import REOPENABLE_STATUSES

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(
    name="orchestrator",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    help=(
        "Agentic ML research sessions: a model proposes SEARCH/REPLACE edits to an experiment, every attempt is "
        "checkpointed in git, run, and fed back; up to ten runs, each reviewable and resumable.\n\n"
        "Start with [bold]orchestrator demo[/bold] (scripted replies, no API key), then "
        "[bold]orchestrator launch IDEA --model deepseek/deepseek-reasoner[/bold]."
    ),
)


@functools.cache
def _console(stderr: bool, /) -> Console:
    """The rich Console for stdout or stderr, made when first needed: rich's import stays out of the time to a
    launch's first line. Give this, never the `out`/`err` stand-ins, to rich objects that hold a console
    (Progress, Live: they use it as a context manager and swap sys.stdout for it)."""
    from rich.console import Console

    # Piped output (logs, CI) gets a wide page rather than rich's 80 columns: results tables stay readable.
    wide = not stderr and not sys.stdout.isatty()
    return Console(stderr=stderr, highlight=False, width=160 if wide else None)


class _ConsoleOnFirstUse:
    """Stands for `_console(stderr)` in `out.print(...)`, `err.print(...)` and other attribute uses."""

    def __init__(self, stderr: bool) -> None:
        self._stderr = stderr

    def __getattr__(self, name: str) -> Any:
        return getattr(_console(self._stderr), name)


out = cast("Console", _ConsoleOnFirstUse(stderr=False))
err = cast("Console", _ConsoleOnFirstUse(stderr=True))

EXIT_FINISHED, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_MODEL = "deepseek/deepseek-reasoner"  # shown in --help; a test checks it is config.Settings' default


def _version(show: bool) -> None:
    if show:
        from orchestrator import __version__

        print(f"orchestrator {__version__}")
        raise typer.Exit(EXIT_FINISHED)


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Agentic ML research sessions (see the commands below)."""


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    from rich.markup import escape

    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, markup=True, highlight=False)
    raise typer.Exit(code)


def _guard(fn: Callable[[], int]) -> None:
    """Run a command: user errors become one line on stderr and exit 2, never a traceback."""
    try:
        code = fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (OrchestratorError, OSError) as exc:
        from orchestrator.secrets import redact

        text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        _fail(redact(text), getattr(exc, "exit_code", EXIT_BAD_INPUT))
    raise typer.Exit(code)


# --------------------------------------------------------------------------------------------------- progress


_PHASE_WORDS = {"ask": "asking", "apply": "applying", "run": "running", "reply": "replied", "run_finished": "ran",
                "baseline": "baseline"}


class _ProgressHooks:
    """Live progress on a terminal; one line per step when piped (CI logs)."""

    def __init__(self, console: Console) -> None:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.started = time.monotonic()
        self.console = console
        self.live = console.is_terminal
        self.bar = Progress(SpinnerColumn(), TimeElapsedColumn(), TextColumn("{task.description}"), console=console,
                            transient=True)
        self.task = self.bar.add_task("starting", total=None)
        self.last = ""

    def __enter__(self) -> _ProgressHooks:
        if self.live:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.bar.stop()

    def progress(self, p: Any) -> None:
        from rich.markup import escape

        where = f"run {p.run} of {p.max_runs}" if p.stage == "experiment" and p.run is not None else p.stage
        attempt = f", attempt {p.attempt}" if p.attempt else ""
        phase = _PHASE_WORDS.get(p.phase, p.phase)
        elapsed = int(time.monotonic() - self.started)
        clock = "" if self.live else f"{elapsed // 60}:{elapsed % 60:02d} elapsed | "  # live: a ticking column
        line = (f"{phase:<9} {where}{attempt} | {clock}"
                f"{p.prompt_tokens + p.completion_tokens:,} tokens | ${p.cost_usd:.4f}")
        if p.message and p.phase in ("finished", "interrupted", "run_finished"):
            from orchestrator.terminal import safe

            line += f" | {safe(p.message)}"
        if self.live:
            if p.phase == "run_finished":  # a permanent line above the live one: crashes and fixes stay visible
                from rich.text import Text

                self.console.print(Text(self.finished_line(p), style="" if p.outcome == "ok" else "red"),
                                   soft_wrap=True)
            self.bar.update(self.task, description=escape(line))
        elif line != self.last:
            self.console.print(line, soft_wrap=True, markup=False)
        self.last = line

    @staticmethod
    def finished_line(p: Any) -> str:
        """One attempt's end, e.g. `run 1 attempt 1: error: exit 1: ValueError: bad shape`."""
        from orchestrator.terminal import safe

        if p.stage == "experiment" and p.run == 0:
            where = "baseline"
        elif p.stage == "experiment" and p.run is not None:
            where = f"run {p.run}" + (f" attempt {p.attempt}" if p.attempt else "")
        else:
            where = p.stage + (f" attempt {p.attempt}" if p.attempt else "")
        return f"{where}: {p.outcome or 'finished'}" + (f": {safe(p.message)}" if p.message else "")

    def retry(self, event: Any) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]model call {event.attempt} failed ({event.kind}: {escape(event.message)}); "
                           f"retrying in {event.wait_s:.1f}s[/yellow]", soft_wrap=True, markup=True)


# --------------------------------------------------------------------------------------------------- helpers


def _parse_env(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"--env expects KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def _make_model(settings: Any, replies_done: int, hooks: _ProgressHooks | None) -> Any:
    from orchestrator.models import make_model

    return make_model(settings.model, api_base=settings.api_base, timeout_s=settings.request_timeout_s,
                      profile=settings.profile, max_attempts=settings.model_max_attempts,
                      on_retry=hooks.retry if hooks else None, start_at=replies_done,
                      client=settings.model_client)


def _absolute_scripted(model: str | None) -> str | None:
    if model and model.startswith("scripted:"):
        return "scripted:" + str(Path(model.removeprefix("scripted:")).expanduser().resolve())
    return model


def _drive(session: Path, settings: Any, reopen: bool = False) -> int:
    from orchestrator.executors import executor_for
    from orchestrator.journal import load_state
    from orchestrator.loop import Driver, session_lock
    from orchestrator.report import results_table

    with session_lock(session), _ProgressHooks(_console(False)) as hooks:  # the lock before the journal is read
        replies_done = load_state(session).session.totals.calls
        model = _make_model(settings, replies_done, hooks)
        driver = Driver(session, model, settings, hooks=hooks, executor=executor_for(settings))
        try:
            state = driver.drive(reopen=reopen)
        except KeyboardInterrupt as exc:
            why = f"stopped by {exc.args[0]}" if exc.args else "interrupted"
            out.print(f"[yellow]{why}[/yellow]; the session is saved. Resume with:\n"
                      f"  orchestrator resume {session}")
            return EXIT_INTERRUPTED
    out.print(results_table(state))
    status = state.session.status
    out.print(f"\nSession {status}" + (f": {state.session.reason}" if state.session.reason else ""), soft_wrap=True)
    hints = [f"orchestrator status {session}", f"orchestrator report {session}", f"orchestrator log {session}"]
    shown = state.session.best_run or max((r.run for r in state.runs if r.status == "ok" and r.run), default=None)
    if shown:
        hints[1:1] = [f"orchestrator show {session} {shown}", f"orchestrator diff {session} {shown}"]
    if status == "interrupted" or status in REOPENABLE_STATUSES:
        hints.append(f"orchestrator resume {session}")
    out.print("\n".join(f"  {h}" for h in hints), soft_wrap=True)
    if status == "interrupted":
        return EXIT_FAILED
    return EXIT_FAILED if status in ("failed", "baseline_failed") else EXIT_FINISHED


def _launch(idea_path: Path, idea_name: str | None, template_name: str | None, cli: dict[str, Any],
            config: Path | None) -> int:
    from orchestrator.config import load_settings
    from orchestrator.new_session import create_session
    from orchestrator.spec import load_idea
    from orchestrator.template import find_template

    settings = load_settings(cli, config)
    idea = load_idea(idea_path, idea_name)
    template = find_template(template_name or idea.template or "sae", settings.templates_dirs)
    max_runs = cli.get("max_runs") or idea.max_runs or settings.max_runs  # each is validated to 1..10
    _check_usable(settings, sandbox_now=settings.sandbox != "auto")

    # The first line, once the journal exists: a folder announced is always one that status and resume can read,
    # whenever the process is killed.
    session = create_session(idea, template, settings, max_runs, on_journaled=lambda path: print(path, flush=True))
    if settings.sandbox == "auto":
        _check_sandbox(settings)  # its probe ran meanwhile; auto never refuses, it may warn
    from orchestrator.models import start_warm_up

    # What the first model call needs (litellm, or a direct route's httpx and price map) loads while the baseline
    # runs. Started only now: a thread importing holds the GIL most of the time, and would slow the copy, git and
    # journal work before the first line.
    start_warm_up(settings.model, settings.api_base, settings.model_client)
    return _drive(session, settings)


def _check_usable(settings: Any, budgets: tuple[float | None, ...] | None = None, sandbox_now: bool = True) -> None:
    """Everything checked before any work (one line, exit 2 on a problem): the runs' --env and interpreter, the
    sandbox, the model's name and credentials, and that each dollar budget (default: the settings' own) can be
    enforced for that model. `sandbox_now=False` (for `--sandbox auto`, which cannot fail): the sandbox's probe
    only starts, and the caller checks it later."""
    from orchestrator.config import check_python
    from orchestrator.new_session import check_budget_enforceable
    from orchestrator.runner import check_env_set

    check_env_set(dict(settings.env))
    check_python(settings.python)
    if sandbox_now:
        _check_sandbox(settings)
    else:
        from orchestrator.sandbox import probe_in_background

        probe_in_background()
    budgets = budgets if budgets is not None else (settings.budget_usd,)
    if settings.profile is None and all(b is None for b in budgets) and _known_provider_key_checked(settings):
        return  # nothing else to check: the model layer loads after the first line
    model = _make_model(settings, 0, None)
    model.check_credentials()  # known providers at once; others (and unknown names) after litellm's import
    for budget in budgets:
        check_budget_enforceable(settings.model_copy(update={"budget_usd": budget}), model)


def _known_provider_key_checked(settings: Any) -> bool:
    """The key check of `ProviderModel.check_credentials` for a provider whose key variable is known, without
    loading the model layer: True once checked, False for a model it cannot judge (another provider, scripted:)."""
    from orchestrator.credentials import check_known_provider
    from orchestrator.direct import route_for

    direct = route_for(settings.model, settings.api_base, settings.model_client) is not None
    return check_known_provider(settings.model, settings.api_base, direct)


def _check_sandbox(settings: Any) -> None:
    """`--sandbox bwrap` where bubblewrap cannot run stops here (exit 2); `auto` falling back warns once."""
    from orchestrator.sandbox import choose

    choice = choose(settings.sandbox)
    if choice.warning:
        err.print(f"[yellow]{choice.warning}[/yellow]", soft_wrap=True, markup=True, highlight=False)


# --------------------------------------------------------------------------------------------------- commands

IdeaArg = Annotated[Path, typer.Argument(help="Idea file (JSON, TOML or YAML): one idea, or a list (pick with --idea).")]
SandboxOpt = Annotated[str | None, typer.Option(
    help="How runs are contained: auto (bubblewrap when it runs here, else none with a warning), bwrap (required), "
         "or none. Sandboxed runs see a read-only tree except their run folder, a private /tmp, no network, and "
         "die with their first process. Every mode restores guarded files a run changed (outcome tampered). "
         "Default auto; ORCH_SANDBOX.")]
AllowNetworkOpt = Annotated[bool | None, typer.Option(
    "--allow-network/--no-network", help="Let sandboxed runs use the network (default: only if the template "
                                         "declares network = true).")]


@app.command()
def launch(
    idea: IdeaArg,
    idea_name: Annotated[str | None, typer.Option("--idea", help="Which idea of a list, by name.")] = None,
    template: Annotated[str | None, typer.Option(help="Template name or folder (default: the idea's, else sae).")] = None,
    model: Annotated[str | None, typer.Option(help="litellm model name as provider/model, e.g. "
                                                   "deepseek/deepseek-reasoner, openai/gpt-4o, "
                                                   "ollama/qwen2.5-coder, or scripted:FILE. "
                                                   f"(default: {DEFAULT_MODEL})")] = None,
    api_base: Annotated[str | None, typer.Option(help="Base URL of an OpenAI-compatible server.")] = None,
    max_runs: Annotated[int | None, typer.Option(help="Runs after the baseline (at most 10; default 10).")] = None,
    root: Annotated[Path | None, typer.Option(help="Folder for session folders (default: experiments/).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds one run may take (default: the template's).")] = None,
    gpus: Annotated[str | None, typer.Option(help="GPU ids for runs, e.g. 0 or 0,1 (CUDA_VISIBLE_DEVICES).")] = None,
    budget_usd: Annotated[float | None, typer.Option(help="Stop before a model call once this much is spent "
                                                          "(a model whose price litellm does not know also needs "
                                                          "--max-tokens-total).")] = None,
    max_tokens_total: Annotated[int | None, typer.Option(help="Stop before a model call once the session has used "
                                                              "this many prompt + completion tokens.")] = None,
    wall_clock: Annotated[float | None, typer.Option(help="Stop after this many seconds of session time; a run "
                                                          "is never given more than the time left.")] = None,
    stall_replies: Annotated[int | None, typer.Option(help="Stop (status stalled) after this many replies in a row "
                                                           "with no edits that apply (default 6).")] = None,
    env: Annotated[list[str] | None, typer.Option(help="KEY=VALUE for runs' environment (repeatable).")] = None,
    python: Annotated[str | None, typer.Option(help="Python interpreter for runs.")] = None,
    sandbox: SandboxOpt = None,
    allow_network: AllowNetworkOpt = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the plot and notes stage.")] = False,
    config: Annotated[Path | None, typer.Option(help="Settings file (default: ./orchestrator.toml).")] = None,
) -> None:
    """Launch an idea: copy the template into ROOT/<time>_<idea>/, run the baseline, then let the model work.

    Every option can also be set in [bold]orchestrator.toml[/bold] in the current folder (or --config FILE),
    one setting per line by its name (model = "openai/gpt-4o", budget_usd = 2, and an \\[env] table for the
    runs' variables), or in an [bold]ORCH_*[/bold] environment variable named after the setting (ORCH_MODEL,
    ORCH_MAX_RUNS, ORCH_BUDGET_USD, ORCH_API_BASE, ORCH_ROOT, ORCH_ENV=K=V,K2=V2 ...). A flag wins over the
    variable, which wins over the file.

    The model's API key comes from the provider's own variable (DEEPSEEK_API_KEY, OPENAI_API_KEY, ...) and is
    checked before anything starts; a server on this machine or the local network given with --api-base needs
    none for openai/ models. deepseek/ models, and openai/ models with --api-base, are sent straight to their
    OpenAI-compatible endpoint, without loading litellm (seconds of CPU); model_client = "litellm" (or
    ORCH_MODEL_CLIENT=litellm) sends them through litellm like every other provider."""
    cli = {"model": _absolute_scripted(model), "api_base": api_base, "max_runs": max_runs, "root": root,
           "timeout_s": timeout, "gpus": gpus, "budget_usd": budget_usd, "wall_clock_s": wall_clock,
           "max_tokens_total": max_tokens_total, "stall_replies": stall_replies,
           "env": _parse_env(env), "python": python, "plots": False if no_plots else None,
           "sandbox": sandbox, "allow_network": allow_network}
    _guard(lambda: _launch(idea, idea_name, template, cli, config))


@app.command()
def batch(
    ideas: Annotated[Path, typer.Argument(help="Idea file holding a list of ideas (JSON, TOML or YAML).")],
    idea_names: Annotated[str | None, typer.Option("--ideas", help="Which ideas, by name: a,b,c.")] = None,
    all_ideas: Annotated[bool, typer.Option("--all", help="Every idea in the file.")] = False,
    template: Annotated[str | None, typer.Option(help="Template name or folder (default: the ideas', else sae).")] = None,
    model: Annotated[str | None, typer.Option(help=f"litellm model name, as for launch (default: {DEFAULT_MODEL}).")] = None,
    api_base: Annotated[str | None, typer.Option(help="Base URL of an OpenAI-compatible server.")] = None,
    gpus: Annotated[str | None, typer.Option(help="The GPU ids the batch shares, e.g. 0,1,2,3 (default: every GPU "
                                                  "found; none found: CPU slots).")] = None,
    per_gpu: Annotated[int | None, typer.Option(help="Runs that may share one GPU at a time (default 1).")] = None,
    slots: Annotated[int | None, typer.Option(help="CPU slots when there are no GPUs: runs at a time (default 1).")] = None,
    parallel: Annotated[int | None, typer.Option(help="Sessions driven at a time (default: four per slot, so the "
                                                      "slots stay busy while sessions wait for their model).")] = None,
    backend: Annotated[str, typer.Option(help="local (this machine) or ray (each run a Ray task; needs the \\[ray] "
                                              "extra).")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to use (default: start a local one for the "
                                                         "batch).")] = None,
    ray_resource: Annotated[list[str] | None, typer.Option(help="NAME=AMOUNT a run asks of Ray (repeatable), e.g. "
                                                               "accelerator_type_A100=0.01; with GPUs it still asks "
                                                               "for one GPU unless GPU=N is given.")] = None,
    name: Annotated[str | None, typer.Option(help="Batch name (default: the idea file's name).")] = None,
    max_runs: Annotated[int | None, typer.Option(help="Runs after each baseline (at most 10; default 10).")] = None,
    root: Annotated[Path | None, typer.Option(help="Folder for the batch folder (default: experiments/).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds one run may take (default: the template's).")] = None,
    budget_usd: Annotated[float | None, typer.Option(help="Dollar budget of the whole batch: no session makes a "
                                                          "model call once the batch has spent it.")] = None,
    session_budget_usd: Annotated[float | None, typer.Option(help="Dollar budget of each session.")] = None,
    max_tokens_total: Annotated[int | None, typer.Option(help="Token budget of each session.")] = None,
    wall_clock: Annotated[float | None, typer.Option(help="Wall-clock budget of each session, in seconds.")] = None,
    env: Annotated[list[str] | None, typer.Option(help="KEY=VALUE for runs' environment (repeatable).")] = None,
    python: Annotated[str | None, typer.Option(help="Python interpreter for runs.")] = None,
    sandbox: SandboxOpt = None,
    allow_network: AllowNetworkOpt = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the plot and notes stages.")] = False,
    config: Annotated[Path | None, typer.Option(help="Settings file (default: ./orchestrator.toml).")] = None,
) -> None:
    """Launch many ideas at once: one session per idea under ROOT/<time>_batch_<name>/, driven concurrently.

    [bold]Slots and leases.[/bold] The batch's GPUs (--gpus, or every GPU found) are its slots, --per-gpu runs
    each; without GPUs it has --slots CPU slots. Sessions do not own a GPU: each run (baseline, run_1 ... run_10,
    plots) leases a free slot when it starts and gives it back when it ends, also on a timeout, a crash or
    Ctrl-C, and sees exactly that GPU in CUDA_VISIBLE_DEVICES. While one session waits for its model, another's
    run uses the GPU. A run that finds every slot taken waits (shown as queued).

    Each session is an ordinary session folder (status, show, diff, report and resume work on it). The batch
    folder works with [bold]status[/bold] (the leaderboard), [bold]report[/bold] (one page comparing the ideas)
    and [bold]resume[/bold] (every unfinished session, under the same leases). Settings come from flags,
    ORCH_* variables and orchestrator.toml as for launch."""
    cli = {"model": _absolute_scripted(model), "api_base": api_base, "max_runs": max_runs, "root": root,
           "timeout_s": timeout, "max_tokens_total": max_tokens_total, "wall_clock_s": wall_clock,
           "env": _parse_env(env), "python": python, "plots": False if no_plots else None,
           "sandbox": sandbox, "allow_network": allow_network}
    options = {"ideas": idea_names, "all": all_ideas, "template": template, "gpus": gpus, "per_gpu": per_gpu,
               "slots": slots, "parallel": parallel, "backend": backend, "ray_address": ray_address,
               "ray_resources": ray_resource, "name": name, "budget_usd": budget_usd,
               "session_budget_usd": session_budget_usd}
    _guard(lambda: _batch(ideas, options, cli, config))


def _batch(ideas_file: Path, opts: dict[str, Any], cli: dict[str, Any], config: Path | None) -> int:
    from orchestrator.batch import parse_ray_resources, pick_ideas
    from orchestrator.config import ConfigError, load_settings
    from orchestrator.leases import slot_pool
    from orchestrator.spec import slugify
    from orchestrator.template import find_template

    settings = load_settings(cli, config)
    chosen = pick_ideas(ideas_file, opts["ideas"], opts["all"])
    template = find_template(opts["template"] or chosen[0].template or "sae", settings.templates_dirs)
    pool = slot_pool(opts["gpus"], opts["per_gpu"], opts["slots"])
    if opts["backend"] not in ("local", "ray"):
        raise ConfigError(f"--backend must be local or ray, got {opts['backend']!r}")
    if opts["backend"] == "local" and (opts["ray_address"] or opts["ray_resources"]):
        raise ConfigError("--ray-address and --ray-resource need --backend ray")
    resources = parse_ray_resources(opts["ray_resources"])
    if opts["backend"] == "ray":
        from orchestrator.ray_executor import check_ray_installed

        check_ray_installed()
    parallel = opts["parallel"] if opts["parallel"] is not None else min(len(chosen), 4 * len(pool.slots()))
    if parallel < 1:
        raise ConfigError("--parallel must be at least 1")
    for budget in ("budget_usd", "session_budget_usd"):
        if opts[budget] is not None and opts[budget] <= 0:
            raise ConfigError(f"--{budget.replace('_', '-')} must be more than 0")
    _check_usable(settings, (opts["budget_usd"], opts["session_budget_usd"]))

    from orchestrator.scheduler import create_batch

    def max_runs(idea: Any) -> int:
        return int(cli.get("max_runs") or idea.max_runs or settings.max_runs)

    folder = create_batch(slugify(opts["name"] or ideas_file.stem) or "ideas", ideas_file, chosen, template,
                          settings, max_runs, pool, parallel, opts["backend"], opts["ray_address"], resources,
                          opts["budget_usd"], opts["session_budget_usd"],
                          on_claimed=lambda claimed: print(claimed, flush=True))  # the first line
    return _drive_batch(folder, settings)


def _drive_batch(folder: Path, settings: Any, forwarded: list[str] | None = None,
                 per_session: dict[str, list[str]] | None = None, reopen: set[str] | None = None) -> int:
    """Drive a batch's sessions; `settings`: what they will run with (launch's, or resume's with its flags)."""
    from orchestrator.batch import leaderboard, load_batch, session_states
    from orchestrator.report import batch_table
    from orchestrator.scheduler import BatchStopped, child_env, drive_batch

    spec = load_batch(folder)
    count = f"{len(spec.sessions)} session" + ("s" if len(spec.sessions) != 1 else "")
    err.print(f"{count} over {spec.pool.describe()} ({spec.backend}), at most {spec.parallel} "
              f"at a time; each session's output: {folder / 'logs'}/", soft_wrap=True, highlight=False)
    extra: dict[str, str] = {}
    fork_entry = None
    if spec.backend == "local":  # sessions are forked from here with everything loaded (not with Ray's threads)
        import orchestrator.loop
        import orchestrator.report_html  # noqa: F401
        from orchestrator.models import preload

        preload(settings.model, settings.api_base, settings.model_client)
        fork_entry = _run_command
    with _BatchView(_console(False)) as view, _ray_for(spec, extra):
        try:
            codes = drive_batch(folder, view, child_env(extra), args=forwarded or [], per_session=per_session,
                                reopen=reopen or set(), fork_entry=fork_entry)
        except BatchStopped as stopped:
            view.close()
            out.print(f"[yellow]{stopped}[/yellow]", soft_wrap=True)
            return EXIT_INTERRUPTED
    spec = load_batch(folder)
    rows = leaderboard(spec, session_states(spec))
    out.print(batch_table(rows, spec))
    statuses = [r.status for r in rows]
    hints = [f"orchestrator status {folder}", f"orchestrator report {folder}"]
    from orchestrator.batch import spent_usd

    spent = spent_usd(folder)
    if spec.budget_usd is not None and spent >= spec.budget_usd:
        waiting = [r.idea for r in rows if r.status in ("not started", "budget_usd")]
        if waiting:
            out.print(f"The batch's ${spec.budget_usd:.4g} budget is spent (${spent:.4f}): {', '.join(waiting)} "
                      "stopped or did not start.", soft_wrap=True, markup=False)
            hints.append(f"orchestrator resume {folder} --budget-usd {spec.budget_usd * 2:.4g}   (a larger budget)")
    elif any(st not in FINAL or st == "baseline_failed" for st in statuses):
        hints.append(f"orchestrator resume {folder}")
    out.print("\n".join(f"  {h}" for h in hints), soft_wrap=True)
    troubled = [idea for idea, code in codes.items() if code != EXIT_FINISHED]
    if troubled:
        out.print(f"Sessions that did not finish cleanly: {', '.join(troubled)} (their output: "
                  f"{folder / 'logs'}/)", soft_wrap=True, markup=False)
    bad = troubled or any(st in ("failed", "baseline_failed", "interrupted", "unreadable", "not started")
                             for st in statuses)
    return EXIT_FAILED if bad else EXIT_FINISHED


def _ray_for(spec: Any, env: dict[str, str]) -> Any:
    """For --backend ray: connect to (or start) the batch's Ray cluster and put its address in `env`."""
    from contextlib import nullcontext

    if spec.backend != "ray":
        return nullcontext()
    from orchestrator.ray_executor import ray_cluster

    return ray_cluster(spec, env)


class _BatchView:
    """The batch's live table on a terminal (updated in place); a plain line per change when piped."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live_display: Any = None
        self.last: dict[str, str] = {}
        self.last_slots = ""
        self.started = time.monotonic()

    def __enter__(self) -> _BatchView:
        if self.console.is_terminal:
            from rich.live import Live

            self.live_display = Live(console=self.console, auto_refresh=False, transient=False)
            self.live_display.start()
        return self

    def close(self) -> None:
        if self.live_display is not None:
            self.live_display.stop()
            self.live_display = None

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, rows: list[Any], busy: int, total: int, queued: int, spent: float) -> None:
        from orchestrator.report import batch_live_table, batch_row_line

        slots = f"slots {busy}/{total} busy, {queued} queued | ${spent:.4f}"
        try:
            if self.live_display is not None:
                self.live_display.update(batch_live_table(rows, slots, time.monotonic() - self.started),
                                         refresh=True)
                return
            for row in rows:
                line = batch_row_line(row)
                if self.last.get(row.idea) != line:
                    self.last[row.idea] = line
                    self.console.print(f"{row.idea}: {line} | {slots}", soft_wrap=True, markup=False)
        except OSError:  # a closed terminal or pipe never stops the batch
            self.live_display = None


@app.command()
def resume(
    session: Annotated[Path, typer.Argument(help="The session folder.")],
    model: Annotated[str | None, typer.Option(help="Continue with another model.")] = None,
    api_base: Annotated[str | None, typer.Option(help="Base URL of an OpenAI-compatible server.")] = None,
    budget_usd: Annotated[float | None, typer.Option(help="New dollar budget.")] = None,
    max_tokens_total: Annotated[int | None, typer.Option(help="New token budget (prompt + completion).")] = None,
    wall_clock: Annotated[float | None, typer.Option(help="New wall-clock budget in seconds.")] = None,
    stall_replies: Annotated[int | None, typer.Option(help="Replies without applicable edits before the "
                                                           "session counts as stalled.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds one run may take.")] = None,
    gpus: Annotated[str | None, typer.Option(help="GPU ids for runs, e.g. 0 or 0,1.")] = None,
    env: Annotated[list[str] | None, typer.Option(help="KEY=VALUE for runs' environment (repeatable; added "
                                                       "to the saved ones).")] = None,
    python: Annotated[str | None, typer.Option(help="Python interpreter for runs.")] = None,
    sandbox: SandboxOpt = None,
    allow_network: AllowNetworkOpt = None,
) -> None:
    """Continue an interrupted session from its journal; journaled replies are never requested again. Given a
    batch folder: every session of the batch that has not finished, under the batch's leases (--budget-usd is
    then the batch's new budget; the other flags go to each session).

    Saved settings apply unless an ORCH_* variable or a flag here changes them. A session that a limit ended
    (budget, tokens, wall clock, stalled) goes on when that limit is raised, or, for stalled, with another
    --model. A session whose baseline failed (baseline_failed) runs its baseline again."""

    forwarded = [arg for flag, value in (("--model", _absolute_scripted(model)), ("--api-base", api_base),
                                         ("--max-tokens-total", max_tokens_total), ("--wall-clock", wall_clock),
                                         ("--stall-replies", stall_replies), ("--timeout", timeout),
                                         ("--gpus", gpus), ("--python", python), ("--sandbox", sandbox))
                 if value is not None for arg in (flag, str(value))]
    forwarded += [arg for pair in env or [] for arg in ("--env", pair)]
    if allow_network is not None:
        forwarded.append("--allow-network" if allow_network else "--no-network")
    overrides = {"model": _absolute_scripted(model), "api_base": api_base, "max_tokens_total": max_tokens_total,
                 "wall_clock_s": wall_clock, "stall_replies": stall_replies, "timeout_s": timeout, "gpus": gpus,
                 "python": python, "sandbox": sandbox, "allow_network": allow_network, "env": _parse_env(env)}

    in_batch = False

    def run() -> int:
        from orchestrator.batch import is_batch
        from orchestrator.loop import session_lock
        from orchestrator.scheduler import follow_batch

        nonlocal in_batch
        in_batch = follow_batch()  # started by a batch: end with it
        if is_batch(session):
            return _resume_batch(session, budget_usd, overrides, forwarded)
        with session_lock(session):  # settings are saved and the journal read only by the session's driver
            return go_on()

    def go_on() -> int:
        from orchestrator.journal import FINAL_STATUSES, load_state
        from orchestrator.loop import resume_settings

        state = load_state(session)
        status = state.session.status
        lifted = {"budget_usd": budget_usd, "wall_clock": wall_clock, "max_tokens": max_tokens_total,
                  "stalled": model or stall_replies, "baseline_failed": True}  # a plain resume reruns it
        extended = status in REOPENABLE_STATUSES and lifted.get(status) is not None
        if status in FINAL_STATUSES and not extended:
            hint = {"budget_usd": "--budget-usd", "wall_clock": "--wall-clock", "max_tokens": "--max-tokens-total",
                    "stalled": "--model or --stall-replies"}.get(status)
            out.print(f"The session is already finished ({status}"
                      + (f": {state.session.reason}" if state.session.reason else "") + "); nothing to do"
                      + (f" (go on with resume {hint})" if hint else "") + ".", soft_wrap=True)
            return EXIT_FINISHED
        settings = resume_settings(session, {
            "model": _absolute_scripted(model), "api_base": api_base, "budget_usd": budget_usd,
            "wall_clock_s": wall_clock, "max_tokens_total": max_tokens_total, "stall_replies": stall_replies,
            "timeout_s": timeout, "gpus": gpus, "env": _parse_env(env), "python": python,
            "sandbox": sandbox, "allow_network": allow_network}, check=_check_usable)
        from orchestrator.models import start_warm_up

        if not in_batch:  # a batch's session: its model calls hold no slot, and its start competes for the CPU
            start_warm_up(settings.model, settings.api_base, settings.model_client)
        return _drive(session, settings, reopen=extended)

    _guard(run)


def _resume_batch(folder: Path, budget_usd: float | None, overrides: dict[str, Any], forwarded: list[str]) -> int:
    """resume BATCH: check the flags once here (one line, exit 2), then drive every session not finished, and
    those a limit ended when that limit is raised (the batch's budget by --budget-usd)."""
    from orchestrator.batch import load_batch, save_batch
    from orchestrator.config import ConfigError, load_settings
    from orchestrator.scheduler import unfinished

    spec = load_batch(folder)
    if overrides.get("gpus") is not None:
        raise ConfigError("a batch's GPUs are its slot pool (batch.json); --gpus applies to single sessions only")
    if budget_usd is not None and budget_usd <= 0:
        raise ConfigError("--budget-usd must be more than 0")
    saved = {k: v for k, v in spec.settings.items() if k != "env"}
    if "***" in str(saved.get("api_base") or ""):  # it held credentials, which are never saved
        saved.pop("api_base")
    given = {k: v for k, v in overrides.items() if v is not None}
    settings = load_settings({**saved, **given})
    _check_usable(settings, (budget_usd, settings.budget_usd))  # the batch's new budget, each session's own
    lifted = {"budget_usd": budget_usd is not None, "wall_clock": "wall_clock_s" in given,
              "max_tokens": "max_tokens_total" in given, "stalled": "model" in given or "stall_replies" in given,
              "baseline_failed": True}
    if budget_usd is not None:
        spec.budget_usd = budget_usd
        save_batch(folder, spec)
    reopen = {status for status, yes in lifted.items() if yes}
    if spec.missing():  # stopped while it created its sessions: make the rest now
        from orchestrator.scheduler import create_missing
        from orchestrator.template import find_template

        create_missing(folder, spec, find_template(spec.template, settings.templates_dirs), settings)
    todo = unfinished(spec, reopen)
    if not todo:
        out.print(f"Every session of the batch has finished; nothing to do ({len(spec.sessions)} sessions).")
        return EXIT_FINISHED
    print(folder.resolve(), flush=True)
    per_session: dict[str, list[str]] = {}
    if budget_usd is not None:  # a session the budget ended goes on: under its own budget, else the batch's
        again = str(spec.session_budget_usd or budget_usd)
        per_session = {entry.path: ["--budget-usd", again] for entry in todo}
    return _drive_batch(folder, settings, forwarded, per_session, reopen)


@app.command()
def status(
    session: Annotated[Path, typer.Argument(help="The session folder, or a batch folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with a `runs` list (for a batch: "
                                                         "{batch, sessions}, each session as status prints it).")] = False,
) -> None:
    """One row per run: status, attempts, metrics against run_0, time, tokens and cost. For a batch folder, the
    leaderboard: one row per idea, best first."""

    def run() -> int:
        from orchestrator.batch import is_batch
        from orchestrator.journal import load_state
        from orchestrator.report import results_table

        if is_batch(session):
            return _batch_status(session, as_json)
        from orchestrator.batch import with_queue

        state = with_queue(session, load_state(session))
        if as_json:
            print(state.model_dump_json(indent=2))
        else:
            out.print(results_table(state))
        return EXIT_FINISHED

    _guard(run)


def _batch_status(folder: Path, as_json: bool) -> int:
    from orchestrator.batch import leaderboard, load_batch, session_states, status_json
    from orchestrator.report import batch_table

    if as_json:
        print(status_json(folder))
        return EXIT_FINISHED
    spec = load_batch(folder)
    out.print(batch_table(leaderboard(spec, session_states(spec, folder)), spec))
    return EXIT_FINISHED


@app.command()
def diff(
    session: Annotated[Path, typer.Argument(help="The session folder.")],
    run: Annotated[str | None, typer.Argument(help="Run number (default: the latest successful run).")] = None,
    against: Annotated[str | None, typer.Option(help="Compare with this run (default: the previous successful one).")] = None,
) -> None:
    """The code change that produced a run, against the previous successful run."""

    def go() -> int:
        from rich.syntax import Syntax

        from orchestrator.journal import load_state
        from orchestrator.report import run_diff

        state = load_state(session)
        rec, base, text = run_diff(session, state, run, against)
        header = f"run_{rec.run} against " + (f"run_{base.run}" if base else "the template")
        if out.is_terminal:
            from rich.markup import escape

            from orchestrator.terminal import safe

            out.print(f"[bold]{header}[/bold]: {escape(safe(rec.plan))}")
            out.print(Syntax(safe(text) or "(no code change)\n", "diff", theme="ansi_dark"))
        else:
            sys.stdout.write(text if text else f"# {header}: no code change\n")
        return EXIT_FINISHED

    _guard(go)


@app.command(name="list")
def list_(root: Annotated[Path, typer.Argument(help="Folder holding session folders.")] = Path("experiments")) -> None:
    """The sessions under ROOT with their status, successful runs, best run and cost."""

    def run() -> int:
        from orchestrator.report import list_sessions, sessions_table

        if not root.is_dir():
            _fail(f"{root} is not a folder" if root.exists() else f"{root} does not exist")
        states = list_sessions(root)
        if not states:
            out.print(f"No sessions under {root}.")
        else:
            out.print(sessions_table(states))
        return EXIT_FINISHED

    _guard(run)


@app.command()
def templates() -> None:
    """The experiment templates that launch can use."""

    def run() -> int:
        from rich.table import Table

        from orchestrator.template import list_templates

        table = Table(title="Templates", title_justify="left")
        for col in ("name", "description", "editable", "ideas", "path"):
            table.add_column(col)
        for t in list_templates():
            table.add_row(t.name, t.description, ", ".join(t.editable), str(len(t.ideas())), str(t.path))
        out.print(table)
        return EXIT_FINISHED

    _guard(run)


# The demo's script was written for these numbers: the CPU's fast preset, one seed, synthetic data, even on a
# GPU machine (where the template would otherwise pick its gpu preset) or with SAE_* variables exported.
DEMO_ENV = {"SAE_FAST": "1", "SAE_PRESET": "cpu", "SAE_DEVICE": "cpu", "SAE_SEEDS": "1", "SAE_MODEL_PATH": ""}


@app.command()
def demo(
    root: Annotated[Path, typer.Option(help="Folder for the session folder.")] = Path("experiments"),
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the plot and notes stage.")] = False,
) -> None:
    """Run the Median-MAD idea on the SAE template with SCRIPTED model replies (no API key; about two minutes on 2 idle
    CPU cores, longer on a busy machine)."""

    def run() -> int:
        from orchestrator.template import find_template

        sae = find_template("sae")
        idea = sae.path / "ideas" / "median_mad_sae.json"
        replies = sae.path / "demo" / "median_mad_replies.yaml"
        err.print("[bold]Demo[/bold]: the model's replies are scripted (recorded in "
                  f"{replies.name}); no model is called. Runs use the CPU's fast preset, whatever the machine "
                  "or the SAE_* variables, so the numbers match the README. Expect about 2 minutes on 2 idle CPU "
                  "cores (its runs are CPU-bound training), longer on a busy machine.", soft_wrap=True)
        cli = {"model": f"scripted:{replies}", "root": root, "env": DEMO_ENV,
               "plots": False if no_plots else None, "max_runs": 5}
        return _launch(idea, None, "sae", cli, None)

    _guard(run)


@app.command()
def show(
    session: Annotated[Path, typer.Argument(help="The session folder.")],
    run: Annotated[str, typer.Argument(help="Run number, e.g. 3 or run_3.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the `status --json` schema with this run only, "
                                                         "its `diff` filled in.")] = False,
) -> None:
    """One run: commit and plan, metrics against the baseline and the previous run, failed attempts, diff."""

    def go() -> int:
        from orchestrator.report import run_view, show_renderables

        view = run_view(session, run)
        if as_json:
            print(view.model_dump_json(indent=2))
        else:
            for part in show_renderables(view):
                out.print(part)
        return EXIT_FINISHED

    _guard(go)


@app.command()
def log(
    session: Annotated[Path, typer.Argument(help="The session folder.")],
    run: Annotated[str | None, typer.Option(help="Only this run's prompts, replies and steps.")] = None,
) -> None:
    """The conversation with the model as a readable transcript (reasoning folded, secrets redacted)."""

    def go() -> int:
        from orchestrator.report import transcript, transcript_renderables

        entries = transcript(session, run)
        if not entries:
            out.print("No messages yet.")
        for part in transcript_renderables(entries):
            out.print(part)
        return EXIT_FINISHED

    _guard(go)


@app.command()
def report(
    session: Annotated[Path, typer.Argument(help="The session folder, or a batch folder.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="HTML file to write "
                                                                      "(default: SESSION/report.html).")] = None,
) -> None:
    """Write one self-contained HTML report (opens offline): results, chart, each run's diff, logs, figures. For a
    batch folder: one page comparing the ideas, linking each session's report (written too)."""

    def go() -> int:
        from orchestrator.batch import is_batch
        from orchestrator.report_html import write_batch_report, write_report

        path = write_batch_report(session, output) if is_batch(session) else write_report(session, output)
        print(path)
        return EXIT_FINISHED

    _guard(go)


def _app_for(argv: list[str]) -> typer.Typer:
    """The app to run a command line with: for one that starts with a command's name, a copy of the app that holds
    only that command. typer makes every command's options from its signature at each start, a cost on the way to
    a launch's first line (about 30 ms for all of ours, a fifth of that for one); what the command parses, prints
    and refuses is the same."""
    from typer.main import get_command_name

    picked = [c for c in app.registered_commands
              if argv and argv[0] == (c.name or get_command_name(getattr(c.callback, "__name__", "")))]
    if not picked:
        return app  # no command, an option, or a misspelled name: the whole app answers (help, suggestions)
    one = copy.copy(app)
    one.registered_commands = picked
    return one


def main() -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        _app_for(sys.argv[1:])()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    _exit_now(code)


def _run_command(argv: list[str]) -> int:
    """Run one command line in this process and return its exit status (a batch's forked session process)."""
    try:
        _app_for(argv)(argv, prog_name="orchestrator")
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _exit_now(code: object) -> NoReturn:
    """End the process as soon as its output is out. A normal interpreter exit lingers for seconds after the last
    line once litellm is loaded (tearing down its modules, its atexit hooks); nothing of ours needs either:
    journal and snapshot are written and fsynced as they go, and the session lock goes with the process."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        sys.stderr.write(f"{code}\n")
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said there
            pass
    if "logging" in sys.modules:  # loaded by litellm or httpx, not by the commands themselves
        sys.modules["logging"].shutdown()
    os._exit(status)


if __name__ == "__main__":
    main()
