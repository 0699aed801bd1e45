import os

# A forgotten model-hub download must fail at once, not hang or pass by luck.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import h5py  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


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
    from cmarr.extract.store import _read_table, _write_table

    def rewrite(path, fn):
        with h5py.File(path, "r+") as f:
            table = fn(_read_table(f["utterances"]))
            del f["utterances"]
            _write_table(f.create_group("utterances"), table)
    return rewrite
