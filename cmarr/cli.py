"""What every cm-arr command shares: ``--version`` and one table of exit codes.

=====  ======================================================================================
code   meaning
=====  ======================================================================================
0      done
1      the command ran to its end and found problems in the data: a store that fails
       validation, utterances left without features (without ``--allow-missing``), a
       manifest that differs from the canonical list under ``--strict``
2      bad input or usage, nothing written: a missing or unreadable file, a wrong option or
       config value, a store or checkpoint that cannot be used, an output that exists or is
       locked by another run
130    interrupted by Ctrl-C (SIGINT); 143 by SIGTERM (128 + the signal number). Finished
       work is kept: the same command resumes
=====  ======================================================================================

The README repeats this table; ``tests/test_cli_common.py`` checks a few codes per command.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator, NoReturn, Optional

import typer
from rich.console import Console

#: The command ran and found problems in the data.
EXIT_PROBLEMS = 1
#: Bad input or usage: nothing was written.
EXIT_USAGE = 2
#: Interrupted: 128 + the signal number (SIGINT 130, SIGTERM 143).
EXIT_SIGNAL_BASE = 128

EXIT_CODES_HELP = ("Exit codes: 0 done; 1 finished but found problems in the data; 2 bad input or usage, nothing "
                   "written; 130/143 interrupted (rerun to resume).")

_err = Console(stderr=True, soft_wrap=True)


def version_text(command: str) -> str:
    import cmarr

    return f"{command} (cm-arr) {cmarr.__version__}"


def version_option(command: str):
    """A ``--version`` option for a typer command or callback: prints ``version_text`` and exits 0."""

    def show(value: bool) -> None:
        if value:
            typer.echo(version_text(command))
            raise typer.Exit(0)

    return typer.Option(None, "--version", callback=show, is_eager=True,
                        help="Print the cm-arr version and exit.")


def fail(message: str, code: int = EXIT_USAGE, console: Optional[Console] = None) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    (console or _err).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def interrupted_code(e: BaseException) -> int:
    """130 for Ctrl-C, 143 for SIGTERM (``cmarr.extract.interrupts.Terminated``)."""
    from cmarr.extract.interrupts import Terminated

    return EXIT_SIGNAL_BASE + int(signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)


@contextlib.contextmanager
def interruptible(outcome: str, console: Optional[Console] = None) -> Iterator[None]:
    """SIGTERM interrupts as Ctrl-C does inside the block; either ends the command with one
    line saying ``outcome`` (what was kept or written) and exit code 130 / 143."""
    from cmarr.extract.interrupts import Terminated, sigterm_interrupts

    try:
        with sigterm_interrupts():
            yield
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
        fail(f"{what}; {outcome}", interrupted_code(e), console)
