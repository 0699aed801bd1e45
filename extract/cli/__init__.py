"""The command-line programs of extraction: ``cm-arr-extract`` (``extract``), ``cm-arr-features``
(``store``) and ``cm-arr-denseface`` (``denseface``)."""
