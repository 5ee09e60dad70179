"""Engine integrations: real inference engines publishing into a loadsvc region.

    vllm/   a stat-logger plugin (vLLM's ``vllm.stat_logger_plugins`` entry point)
            publishing each DP engine's load, and an ASGI middleware serving
            ``GET /v1/loads`` from vLLM's own HTTP server

Each integration imports its engine only in the module that must subclass or
call the engine's own classes, so loadsvc never depends on an engine.
"""
