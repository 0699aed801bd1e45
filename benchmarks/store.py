"""Feature-store benchmark: an IEMOCAP-sized synthetic store, written and read back.

    python benchmarks/store.py [--utterances 5531] [--dir /tmp] [--reads 5000]

Prints size on disk, write time, random-read utterances/s through the lazy per-process
path (``FeatureStore.get`` of every modality of a random utterance), load-all MB/s, and
the checksum pass (``FeatureStore.verify``, alone and inside ``load_all(verify=True)``).
Frame counts are drawn around IEMOCAP's averages: speech 225x768, text 25x768, video 45x342.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from cmarr.extract.base import LABELS
from cmarr.extract.store import FeatureStore, StoreWriter

SHAPES = {"speech": (225, 768), "text": (25, 768), "video": (45, 342)}


def _drop_page_cache() -> bool:
    """Ask the kernel to drop clean cached pages (needs root) so load-all reads the disk."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utterances", type=int, default=5531)
    ap.add_argument("--reads", type=int, default=5000)
    ap.add_argument("--dir", default=None, help="Where to write the store (default: a temporary folder).")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = args.utterances
    ids = [f"Ses0{1 + i % 5}F_bench_{i:05d}" for i in range(n)]
    table = pd.DataFrame({"utterance_id": ids, "corpus": "synthetic", "session": [1 + i % 5 for i in range(n)],
                          "speaker": "bench", "label": [LABELS[i % 4] for i in range(n)],
                          "fold": [1 + i % 5 for i in range(n)], "start": 0.0, "end": 4.5})
    prov = {m: {"model": "benchmark-random", "dim": d} for m, (_, d) in SHAPES.items()}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "bench.h5"
        # one pool of random frames, sliced per utterance, so that generating data does not dominate
        pools = {m: rng.standard_normal((4 * t, d)).astype(np.float16) for m, (t, d) in SHAPES.items()}
        lengths = {m: np.clip(rng.gamma(4.0, t / 4.0, n).astype(int), 1, 4 * t) for m, (t, _) in SHAPES.items()}
        t0 = time.perf_counter()
        with StoreWriter(path, table, prov, chunk_size=256) as w:
            for i, u in enumerate(ids):
                for m in SHAPES:
                    w.add(u, m, pools[m][: lengths[m][i]], frame_rate=50.0)
        write_s = time.perf_counter() - t0
        size = path.stat().st_size
        payload = sum(int(lengths[m].sum()) * SHAPES[m][1] * 2 for m in SHAPES)

        order = rng.integers(0, n, args.reads)

        def random_reads() -> float:
            store = FeatureStore(path)
            store.get(ids[0], "speech")  # open the handle
            t0 = time.perf_counter()
            for i in order:
                for m in SHAPES:
                    store.get(ids[i], m)
            dt = time.perf_counter() - t0
            store.close()
            return dt

        read_s = random_reads()  # the file was just written: in the page cache
        read_cold_s = random_reads() if _drop_page_cache() else None

        cold = _drop_page_cache()
        t0 = time.perf_counter()
        everything = FeatureStore(path).load_all()
        load_s = time.perf_counter() - t0
        loaded = sum(a.nbytes for d in everything.values() for a in d.values())
        del everything
        # the checksum pass of lazy training, merge and extending a store: 64 MiB pieces
        _drop_page_cache()
        t0 = time.perf_counter()
        FeatureStore(path).verify()
        verify_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        FeatureStore(path).load_all(verify=True)
        load_verify_s = time.perf_counter() - t0

    tab = Table(title=f"Feature store, {n} utterances (speech+text+video, float16)")
    for col in ("measure", "value", "target (2-core machine)"):
        tab.add_column(col)
    tab.add_row("size on disk", f"{size / 1e9:.2f} GB (payload {payload / 1e9:.2f} GB)", "")
    tab.add_row("write (incl. final assembly, fsync)", f"{write_s:.1f} s ({payload / 1e6 / write_s:.0f} MB/s)", "")
    tab.add_row("random utterance reads, 3 modalities each (file in page cache)", f"{args.reads / read_s:,.0f} utt/s",
                ">= 5,000 utt/s")
    if read_cold_s is not None:
        tab.add_row("random utterance reads, 3 modalities each (cold page cache)",
                    f"{args.reads / read_cold_s:,.0f} utt/s", "")
    cache = "cold page cache" if cold else "file in page cache (could not drop it)"
    tab.add_row(f"load-all ({cache})", f"{loaded / 1e6 / load_s:,.0f} MB/s ({load_s:.1f} s)", ">= 300 MB/s")
    tab.add_row(f"verify: sha256 of every frame in 64 MiB pieces ({cache})",
                f"{loaded / 1e6 / verify_s:,.0f} MB/s ({verify_s:.1f} s)", "")
    tab.add_row("load-all with the checksum check, as cm-arr-train (file in page cache)",
                f"{loaded / 1e6 / load_verify_s:,.0f} MB/s ({load_verify_s:.1f} s)", "")
    Console(width=160).print(tab)


if __name__ == "__main__":
    main()
