"""The surfaces: how a store's view reaches routers.

    grpc.py     loadsvc.v1.LoadService (GetLoads, WatchLoads), SGLang's GetLoads, health,
                reflection
    services.py add_grpc_surfaces(): every gRPC service (those and ORCA) on one server
    orca.py     ORCA's OpenRcaService/StreamCoreMetrics for weighted round robin clients
    rest.py     GET /v1/loads (JSON, Prometheus), /health, /metrics on FastAPI
    encode.py   a view as JSON and as protobuf (shared by gRPC and REST)
    limits.py   connection, header, body and timeout limits of the HTTP and gRPC servers

Each reads a loadsvc.core.store.LoadStore and never writes a region.
"""
