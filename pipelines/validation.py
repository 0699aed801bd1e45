"""Train / validation / test split of one fold.

The paper does not say how it picks the epoch it reports. Selecting on the test fold is not
allowed, so a validation part is held out, and the rule is ``DataConfig.validation``:

- ``"stratified"`` (default): a label-stratified ``val_fraction`` (10 %) of the utterances of
  the training sessions, drawn with a generator seeded by ``(seed, fold)``. Every label with
  at least two training utterances gets at least one validation utterance. Test = the whole
  held-out fold.
- ``"next-session"``: every utterance of the next fold after the test one (cyclic in the
  store's sorted folds) is validation; the remaining folds train.
- ``"speaker"``: the MMIN rule. One speaker of the held-out fold is validation, the others
  are test; all other folds train. Needs two speakers in the fold. Which one is validation
  alternates with the fold's position among the store's folds (the fold's sorted speakers,
  the first for the first fold, the second for the second, ...): IEMOCAP's sorted speakers
  are F before M in every session, so always taking the first would test only the male
  speakers. Each fold still tests one speaker, about half of its session.

The test utterances are never seen by training or selection: only the best checkpoint (by
validation) is evaluated on them, once, at the end of the fold.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class SplitError(Exception):
    """A fold that cannot be split (no test utterances, empty validation, ...)."""


@dataclass(frozen=True)
class FoldSplit:
    fold: int
    train: np.ndarray  # indices into the store's utterance table
    val: np.ndarray
    test: np.ndarray
    rule: str


def split_fold(folds: np.ndarray, labels: np.ndarray, speakers: np.ndarray, fold: int,
               rule: str = "stratified", val_fraction: float = 0.1, seed: int = 0,
               where: str = "store") -> FoldSplit:
    """Indices of the train, validation and test parts of ``fold`` (see module docstring)."""
    folds = np.asarray(folds)
    all_folds = sorted(int(f) for f in np.unique(folds))
    test_mask = folds == fold
    if not test_mask.any():
        raise SplitError(f"{where}: fold {fold} has no test utterances (the store's folds are "
                         f"{', '.join(map(str, all_folds))})")
    if len(all_folds) < 2:
        raise SplitError(f"{where}: only one fold ({all_folds[0]}); cross-validation needs at least two")
    rng = np.random.default_rng([int(seed), int(fold), 7])
    train_mask = ~test_mask
    val_mask = np.zeros_like(test_mask)
    if rule == "stratified":
        for y in np.unique(labels[train_mask]):
            idx = np.flatnonzero(train_mask & (labels == y))
            if len(idx) < 2:
                continue
            n_val = max(1, int(round(val_fraction * len(idx))))
            val_mask[rng.choice(idx, size=n_val, replace=False)] = True
        train_mask &= ~val_mask
    elif rule == "next-session":
        nxt = all_folds[(all_folds.index(fold) + 1) % len(all_folds)]
        val_mask = folds == nxt
        train_mask &= ~val_mask
    elif rule == "speaker":
        spk = sorted(set(speakers[test_mask].tolist()))
        if spk == [""]:
            raise SplitError(f"{where}: validation rule 'speaker' needs the speaker of each utterance, and the "
                             "store's utterance table has no 'speaker' values; use another data.validation")
        if len(spk) < 2:
            raise SplitError(f"{where}: validation rule 'speaker' needs two speakers in fold {fold}, found {spk}")
        val_mask = test_mask & (speakers == spk[all_folds.index(fold) % len(spk)])
        test_mask = test_mask & ~val_mask
    else:
        raise SplitError(f"{where}: unknown validation rule {rule!r}")
    split = FoldSplit(fold, np.flatnonzero(train_mask), np.flatnonzero(val_mask), np.flatnonzero(test_mask), rule)
    for name in ("train", "val", "test"):
        if len(getattr(split, name)) == 0:
            raise SplitError(f"{where}: fold {fold}: the {name} part is empty under validation rule {rule!r}")
    return split
