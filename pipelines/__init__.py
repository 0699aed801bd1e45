"""Training, evaluation and prediction of CM-ARR on the feature stores of :mod:`cmarr.extract`.

- :mod:`.config`: the run's settings; :mod:`.data`: a store read for training, batches;
  :mod:`.conditions`: the seven conditions; :mod:`.validation`: a fold's split;
  :mod:`.metrics`: WAR/UAR and the Table 2 layout.
- :mod:`.train`: a run of folds into RUN_DIR; :mod:`.fold`: one fold's recipe;
  :mod:`.diagnostics`: the log's diagnostic columns; :mod:`.runtime`: device, torchrun,
  seeds, compile; :mod:`.jobs`: folds as concurrent processes; :mod:`.run_dir` and
  :mod:`.checkpoint`: the files of a run; :mod:`.errors`: its errors.
- :mod:`.predict`: checkpoints applied to a store; :mod:`.reps`: representations for Fig. 5;
  :mod:`.combine`: RUN_DIRs of separate jobs combined.
- :mod:`.cli`: ``cm-arr-train``, ``cm-arr-results``, ``cm-arr-predict``.
- :mod:`.demo`: the whole pipeline on an embedded corpus, and the synthetic stores of the
  tests and benchmarks.
"""
