"""``make demo``: the whole pipeline on an embedded corpus, from raw media to the results table.

    python -m cmarr.pipelines.demo --out demo_out [--seed N] [--quick] [--audio auto|espeak|synth]

The stages and what they write: :mod:`cmarr.pipelines.demo.run`. Errors of a stage are one
line naming it, exit status 1.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from . import DemoError
from .run import DemoConfig, run_demo


def _app():
    import typer

    app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])

    @app.command()
    def demo(out: Path = typer.Option(Path("demo_out"), "--out", help="Output folder (corpus, store, runs, report)."),
             seed: int = typer.Option(0, "--seed", help="Seeds the corpus, the random models and training."),
             quick: bool = typer.Option(False, "--quick", help="Smoke-test size: 20 utterances, 2 epochs."),
             audio: str = typer.Option("auto", "--audio", help="auto (espeak-ng when installed), espeak or synth.")):
        """Build a small IEMOCAP-layout corpus, extract features, train CM-ARR and the baseline
        over 5 folds, print the comparison and write the report folder."""
        from rich.console import Console
        from rich.markup import escape

        err = Console(stderr=True)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is local
        try:
            import transformers

            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        except ImportError as e:
            err.print(f"[bold red]error:[/] cannot import transformers: {escape(str(e))}")
            raise typer.Exit(1) from None
        cfg = DemoConfig.quick_config(seed) if quick else DemoConfig(seed=seed)
        cfg = dataclasses.replace(cfg, audio=audio)
        try:
            run_demo(out, cfg)
        except DemoError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
            raise typer.Exit(1) from None
        except Exception as e:  # a stage's own error type: name it, without a traceback
            names = {"ExtractError", "StoreError", "ManifestError", "TrainError", "DataError", "ConfigError",
                     "SplitError", "AudioError"}
            if type(e).__name__ not in names:
                raise
            err.print(f"[bold red]error ({type(e).__name__}):[/] {escape(str(e))}", soft_wrap=True)
            raise typer.Exit(1) from None

    return app


def main() -> None:
    _app()()


if __name__ == "__main__":
    main()
