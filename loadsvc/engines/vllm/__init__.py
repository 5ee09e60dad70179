"""vLLM publishing into loadsvc, with no patch to vLLM.

    stat_logger.py  LoadsvcStatLogger: vLLM's ``vllm.stat_logger_plugins`` entry point,
                    one per DP engine, publishing each engine's rank (imports vLLM)
    rank.py         EngineRank: vLLM's stats -> LoadSnapshot, when to publish (no vLLM import)
    middleware.py   LoadsMiddleware: ``GET /v1/loads`` on vLLM's own HTTP server
                    (``--middleware loadsvc.engines.vllm.middleware.LoadsMiddleware``)
    settings.py     the LOADSVC_* environment variables both read

docs/vllm.md has the three commands, the mapping table and the rules.
"""
