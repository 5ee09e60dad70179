"""The core: what a snapshot is, where it lives, and how it is read.

    schema.py   the snapshot Structs (generated from proto/loadsvc/v1/loads.proto into
                _structs.py by the rules in _derive.py, checked here), field lists, fingerprint
    region.py   the shared-memory region: ShmPublisher writes a rank, ShmReader reads them
                (the changed-rank loop in C: _shmfast.c)
    store.py    LoadStore: one process's view of a region, with freshness and an aggregate

    publisher --> region --> store --> surfaces (loadsvc.surfaces)
"""
