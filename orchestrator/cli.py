"""The command line: parses arguments, calls the rooms, renders with rich. No logic of its own."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from orchestrator.errors import OrchestratorError
from orchestrator.journal import REOPENABLE_STATUSES

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

# Piped output (logs, CI) gets a wide page rather than rich's 80 columns, so results tables stay readable.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False)

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
                      on_retry=hooks.retry if hooks else None, start_at=replies_done)


def _absolute_scripted(model: str | None) -> str | None:
    if model and model.startswith("scripted:"):
        return "scripted:" + str(Path(model.removeprefix("scripted:")).expanduser().resolve())
    return model


def _drive(session: Path, settings: Any, reopen: bool = False) -> int:
    from orchestrator.journal import load_state
    from orchestrator.loop import Driver, session_lock
    from orchestrator.report import results_table

    with session_lock(session), _ProgressHooks(out) as hooks:  # the lock before the journal is read
        replies_done = load_state(session).session.totals.calls
        model = _make_model(settings, replies_done, hooks)
        driver = Driver(session, model, settings, hooks=hooks)
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
    return EXIT_FAILED if status == "failed" else EXIT_FINISHED


def _launch(idea_path: Path, idea_name: str | None, template_name: str | None, cli: dict[str, Any],
            config: Path | None) -> int:
    from orchestrator.config import check_python, load_settings
    from orchestrator.loop import check_budget_enforceable, create_session
    from orchestrator.spec import load_idea
    from orchestrator.template import find_template

    settings = load_settings(cli, config)
    idea = load_idea(idea_path, idea_name)
    template = find_template(template_name or idea.template or "sae", settings.templates_dirs)
    max_runs = cli.get("max_runs") or idea.max_runs or settings.max_runs  # each is validated to 1..10
    from orchestrator.runner import check_env_set

    check_env_set(dict(settings.env))
    check_python(settings.python)
    _check_sandbox(settings)
    model = _make_model(settings, 0, None)
    model.check_credentials()  # known providers at once; others (and unknown names) after litellm's import
    check_budget_enforceable(settings, model)

    def claimed(session: Path) -> None:
        start_warm_up(settings.model, settings.api_base)  # litellm's import overlaps the copy, git and baseline

    from orchestrator.models import start_warm_up

    session = create_session(idea, template, settings, max_runs, on_claimed=claimed)
    # The first line, once the journal exists: a folder announced is always one that status and resume can read,
    # whenever the process is killed.
    print(session, flush=True)
    return _drive(session, settings)


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
    none for openai/ models."""
    cli = {"model": _absolute_scripted(model), "api_base": api_base, "max_runs": max_runs, "root": root,
           "timeout_s": timeout, "gpus": gpus, "budget_usd": budget_usd, "wall_clock_s": wall_clock,
           "max_tokens_total": max_tokens_total, "stall_replies": stall_replies,
           "env": _parse_env(env), "python": python, "plots": False if no_plots else None,
           "sandbox": sandbox, "allow_network": allow_network}
    _guard(lambda: _launch(idea, idea_name, template, cli, config))


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
    """Continue an interrupted session from its journal; journaled replies are never requested again.

    Saved settings apply unless an ORCH_* variable or a flag here changes them. A session that a limit ended
    (budget, tokens, wall clock, stalled) goes on when that limit is raised, or, for stalled, with another
    --model."""

    def run() -> int:
        from orchestrator.loop import session_lock

        with session_lock(session):  # settings are saved and the journal read only by the session's driver
            return go_on()

    def go_on() -> int:
        from orchestrator.config import check_python
        from orchestrator.journal import FINAL_STATUSES, load_state
        from orchestrator.loop import check_budget_enforceable, resume_settings

        state = load_state(session)
        status = state.session.status
        lifted = {"budget_usd": budget_usd, "wall_clock": wall_clock, "max_tokens": max_tokens_total,
                  "stalled": model or stall_replies}
        extended = status in REOPENABLE_STATUSES and lifted.get(status) is not None
        if status in FINAL_STATUSES and not extended:
            hint = {"budget_usd": "--budget-usd", "wall_clock": "--wall-clock", "max_tokens": "--max-tokens-total",
                    "stalled": "--model or --stall-replies"}.get(status)
            out.print(f"The session is already finished ({status}"
                      + (f": {state.session.reason}" if state.session.reason else "") + "); nothing to do"
                      + (f" (go on with resume {hint})" if hint else "") + ".", soft_wrap=True)
            return EXIT_FINISHED
        from orchestrator.runner import check_env_set

        def usable(settings: Any) -> None:  # checked before the new settings are saved
            check_env_set(dict(settings.env))
            check_python(settings.python)
            _check_sandbox(settings)
            llm = _make_model(settings, 0, None)
            llm.check_credentials()
            check_budget_enforceable(settings, llm)

        settings = resume_settings(session, {
            "model": _absolute_scripted(model), "api_base": api_base, "budget_usd": budget_usd,
            "wall_clock_s": wall_clock, "max_tokens_total": max_tokens_total, "stall_replies": stall_replies,
            "timeout_s": timeout, "gpus": gpus, "env": _parse_env(env), "python": python,
            "sandbox": sandbox, "allow_network": allow_network}, check=usable)
        from orchestrator.models import start_warm_up

        start_warm_up(settings.model, settings.api_base)
        return _drive(session, settings, reopen=extended)

    _guard(run)


@app.command()
def status(
    session: Annotated[Path, typer.Argument(help="The session folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with a `runs` list.")] = False,
) -> None:
    """One row per run: status, attempts, metrics against run_0, time, tokens and cost."""

    def run() -> int:
        from orchestrator.journal import load_state
        from orchestrator.report import results_table

        state = load_state(session)
        if as_json:
            print(state.model_dump_json(indent=2))
        else:
            out.print(results_table(state))
        return EXIT_FINISHED

    _guard(run)


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
    session: Annotated[Path, typer.Argument(help="The session folder.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="HTML file to write "
                                                                      "(default: SESSION/report.html).")] = None,
) -> None:
    """Write one self-contained HTML report (opens offline): results, chart, each run's diff, logs, figures."""

    def go() -> int:
        from orchestrator.report_html import write_report

        path = write_report(session, output)
        print(path)
        return EXIT_FINISHED

    _guard(go)


def main() -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        app()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    _exit_now(code)


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
    logging.shutdown()
    os._exit(status)


if __name__ == "__main__":
    main()
