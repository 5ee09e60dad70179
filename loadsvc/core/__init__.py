"""The core: what a snapshot is, where it lives, and how it is read.

    schema.py   the snapshot Structs, derived from proto/loadsvc/v1/loads.proto
    region.py   the shared-memory region: ShmPublisher writes a rank, ShmReader reads them
                (the changed-rank loop in C: _shmfast.c)
    store.py    LoadStore: one process's view of a region, with freshness and an aggregate

    publisher --> region --> store --> surfaces (loadsvc.surfaces)
"""
