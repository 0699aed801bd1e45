"""The HDF5 feature store: the contract between extraction and training.

One file per corpus (or shard): every utterance's frames per modality, the utterance table,
per-modality provenance and the recorded extraction failures. ``docs/feature-store.md``
describes the layout and what writing guarantees. Reading (``FeatureStore``) needs neither
the writer nor POSIX file locks.
"""
from cmarr.extract.store.export import ExportError, export_mmin
from cmarr.extract.store.format import (
    ERROR_COLUMNS,
    REQUIRED_COLUMNS,
    SCHEMA_VERSION,
    StoreError,
    parse_shard_tag,
    read_table,
    select_shard,
    utterance_order,
    write_table,
)
from cmarr.extract.store.h5io import NO_ROOM, write_failure
from cmarr.extract.store.merge import merge_stores
from cmarr.extract.store.provenance import comparable_provenance, provenance_differences, without_locations
from cmarr.extract.store.reader import FeatureStore
from cmarr.extract.store.validate import errors_hint, validate_store
from cmarr.extract.store.writer import CHUNK_BYTES, CHUNK_SIZE, OutputLock, StoreWriter, make_folder

__all__ = ["CHUNK_BYTES", "CHUNK_SIZE", "ERROR_COLUMNS", "NO_ROOM", "REQUIRED_COLUMNS", "SCHEMA_VERSION",
           "ExportError", "FeatureStore", "OutputLock", "StoreError", "StoreWriter", "comparable_provenance",
           "errors_hint", "export_mmin", "make_folder", "merge_stores", "parse_shard_tag", "provenance_differences",
           "read_table", "select_shard", "utterance_order", "validate_store", "without_locations", "write_failure",
           "write_table"]
