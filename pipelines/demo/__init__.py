"""The demo: the whole pipeline on an embedded corpus (``python -m cmarr.pipelines.demo``),
and the synthetic corpora and stores the tests and benchmarks use.

- :mod:`.run`: the demo's stages, from raw media to the report; :mod:`.__main__` its command line.
- :mod:`.corpus`, :mod:`.media`, :mod:`.espeak`: small IEMOCAP / MSP-IMPROV release trees with real media.
- :mod:`.models`: the models the demo extracts features with.
- :mod:`.report`: the demo's results.md and figures.
- :mod:`.synthetic`: synthetic feature stores (two generators).
"""


class DemoError(Exception):
    """A demo that cannot run (output folder not usable, a stage failed). ``str(e)`` says
    which file or stage and why."""
