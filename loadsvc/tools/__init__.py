"""Tools built on the library, for demos, tests and benchmarks (not imported by the library).

    engine.py    `loadsvc engine`: a toy inference engine publishing its real queue state
    router.py    `loadsvc router`: the reference power-of-two-choices router on WatchLoads
    simulate.py  `loadsvc simulate`: simulated ranks publishing into a region or a collector
    demo.py      `loadsvc demo`: simulator (or engine + router) and serve, on one machine
    fleet.py     Fleet: toy engines, routers, smg and real vLLM servers as local processes
    procs.py     starting, waiting for and stopping processes; free ports
"""
