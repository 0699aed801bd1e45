"""Shared fixtures. Environment variables the tests read:

- ``CMARR_TEST_THREADS``: when set, ``torch.set_num_threads(int(value))`` at the start of
  the session's tests (once collected, so it also overrides the count some modules (e.g.
  test_predict.py) set at import), e.g. to run the batching/process/thread comparisons
  (tolerances in ``tests/tolerance.py``) under another intra-op thread count. The
  ``one_thread`` fixture still sets one thread for its modules; subprocesses follow
  ``OMP_NUM_THREADS``.
- ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``: set to 1 unless given.
"""
import os

# A forgotten model-hub download must fail at once, not hang or pass by luck.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import h5py  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_finish(session):
    threads = os.environ.get("CMARR_TEST_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread is faster than two contending with other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def rewrite_table():
    """``rewrite_table(path, fn)`` replaces a store's utterance table by ``fn(table)``, as
    another tool or an old version might have written it."""
    from cmarr.extract.store import read_table, write_table

    def rewrite(path, fn):
        with h5py.File(path, "r+") as f:
            table = fn(read_table(f["utterances"]))
            del f["utterances"]
            write_table(f.create_group("utterances"), table)
    return rewrite


#: The small CM-ARR used by the end-to-end training tests (seconds per run on the CPU).
TINY_MODEL = {"d_model": 16, "seq_len": 8, "flow_hidden": 16, "flow_steps": 1, "umc_heads": 2, "fusion_heads": 2,
              "rcan_blocks": 1}


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(path, batch_size=8, epochs=2, **model)`` writes a cm-arr-train config of
    the small model (``model`` overrides its fields) and returns ``path``."""
    import yaml

    def write(path, batch_size=8, epochs=2, **model):
        doc = {"model": {**TINY_MODEL, **model},
               "optim": {"lr": 1.0e-3, "batch_size": batch_size, "epochs": epochs, "eval_batch_size": 64},
               "data": {"val_fraction": 0.2}}
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path
    return write
