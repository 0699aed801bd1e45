"""The command lines of training, combining and prediction: ``cm-arr-train`` (:mod:`.train`),
``cm-arr-results`` (:mod:`.results`), ``cm-arr-predict`` (:mod:`.predict`)."""
