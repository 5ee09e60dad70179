"""docker-compose.yml and Dockerfile describe the multi-node topology, with commands that really parse.

No Docker engine runs here: the structure is checked, every service's command is
parsed with loadsvc's own argument parser (or the router example's), and the
cross-references (ports, endpoints, key files, ranks) are checked against each
other. tests/test_netns.py then runs the same commands for real.
"""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path
from typing import Any

import pytest

from loadsvc.cli import _serve_settings, _simulate_settings, build_parser

yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extra: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def loadsvc_args(command: list[str]) -> Any:
    assert command[0] == "loadsvc", command
    return build_parser().parse_args(command[1:])


def shell_commands(command: list[str]) -> list[list[str]]:
    """`sh -c "a && b"` -> [a, b] as argument lists."""
    assert command[:2] == ["sh", "-c"], command
    return [shlex.split(part) for part in command[2].split("&&")]


def router_module() -> Any:
    spec = importlib.util.spec_from_file_location("router_example", ROOT / "examples" / "router.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_services_build_the_repo_image(compose):
    services = compose["services"]
    assert set(services) == {"keys", "node0", "node1", "node2", "router", "engine0", "engine1", "gateway"}
    for name, svc in services.items():
        assert svc["build"] == ".", name
        assert isinstance(svc["command"], list), f"{name}: exec-form command (no shell re-parsing)"
    text = DOCKERFILE.read_text()
    assert text.startswith("#") and "FROM python:3.11" in text
    assert "pip install '.[gateway]'" in text, \
        "the image installs the project (with the smg gateway) with pip from the repo"
    assert "apt-get install -y --no-install-recommends gcc" in text, "a compiler for loadsvc.core._shmfast"
    assert "COPY examples ./examples" in text and "WORKDIR /app" in text
    assert (ROOT / ".dockerignore").exists()


def test_node0_serves_collects_with_curve_and_has_a_healthcheck(compose):
    node0 = compose["services"]["node0"]
    args = loadsvc_args(node0["command"])
    settings = _serve_settings(args)  # the flag combinations `loadsvc serve` accepts
    assert args.command == "serve" and args.host == "0.0.0.0" and args.dp_size == 8
    assert settings.collect == "tcp://0.0.0.0:5557"
    assert settings.curve is not None, "the relay uses CURVE in the demo"
    published = {int(p.split(":")[0]): int(p.split(":")[1]) for p in node0["ports"]}
    assert published == {args.grpc_port: args.grpc_port, args.http_port: args.http_port}
    assert "5557" in node0["expose"]
    check = node0["healthcheck"]["test"]
    assert check[0] == "CMD" and f"127.0.0.1:{args.http_port}/health" in " ".join(check)
    assert node0["depends_on"]["keys"]["condition"] == "service_completed_successfully"
    assert "keys:/keys:ro" in node0["volumes"]
    assert args.stale_after <= 3 < args.unreachable_after  # small enough to watch in the demo


def test_publishers_push_every_rank_of_node0_exactly_once(compose):
    services = compose["services"]
    node0 = loadsvc_args(services["node0"]["command"])
    collect_port = node0.collect.rsplit(":", 1)[1]
    seen: list[int] = []
    for name in ("node1", "node2"):
        svc = services[name]
        args = loadsvc_args(svc["command"])
        settings = _simulate_settings(args)
        assert args.command == "simulate"
        assert args.zmq == f"tcp://node0:{collect_port}", "publishers reach node0 by service name"
        assert args.dp_size == node0.dp_size
        assert settings.curve is not None
        assert args.curve_server_key == node0.curve_secret_key.with_suffix(".key")
        assert args.curve_secret_key.parent == node0.curve_authorized_dir, \
            f"{name}'s public certificate must sit in node0's authorized dir"
        assert args.curve_secret_key.name == f"{name}.key_secret"
        assert svc["depends_on"]["node0"]["condition"] == "service_healthy"
        assert svc["depends_on"]["keys"]["condition"] == "service_completed_successfully"
        seen.extend(settings.ranks)
    assert sorted(seen) == list(range(node0.dp_size)), "ranks 0-7 all remote, each once"


def test_keys_service_generates_every_file_the_others_use(compose, tmp_path):
    services = compose["services"]
    written: set[Path] = set()
    for cmd in shell_commands(services["keys"]["command"]):
        args = loadsvc_args(cmd)
        assert args.command == "keys" and args.keys_command == "gen"
        written |= {args.dir / f"{args.name}.key", args.dir / f"{args.name}.key_secret"}
    node0 = loadsvc_args(services["node0"]["command"])
    needed = {node0.curve_secret_key}
    for name in ("node1", "node2"):
        args = loadsvc_args(services[name]["command"])
        needed |= {args.curve_server_key, args.curve_secret_key,
                   args.curve_secret_key.with_suffix(".key")}
    assert needed <= written, needed - written
    assert "keys:/keys" in services["keys"]["volumes"]
    assert "keys" in compose["volumes"]


def test_router_watches_node0(compose):
    router = compose["services"]["router"]
    cmd = router["command"]
    assert cmd[0] == "python" and cmd[1] == "/app/examples/router.py"
    args = router_module().build_parser().parse_args(cmd[2:])
    node0 = loadsvc_args(compose["services"]["node0"]["command"])
    assert args.grpc == f"node0:{node0.grpc_port}"
    assert router["depends_on"]["node0"]["condition"] == "service_healthy"


def test_router_picks_the_less_loaded_of_two_healthy_ranks():
    import random

    from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb

    router = router_module()
    healthy, stale = pb.LOAD_STATUS_HEALTHY, pb.LOAD_STATUS_STALE
    loads = [pb.LoadSnapshot(dp_rank=0, num_running_reqs=50, status=healthy),
             pb.LoadSnapshot(dp_rank=1, num_running_reqs=5, num_waiting_reqs=1, status=healthy),
             pb.LoadSnapshot(dp_rank=2, num_running_reqs=0, status=stale)]
    rng = random.Random(0)
    for _ in range(20):
        chosen, other = router.pick_p2c(loads, rng)
        assert (chosen.dp_rank, other.dp_rank) == (1, 0)  # rank 2 is stale: never a candidate
    assert router.pick_p2c(loads[2:], rng) is None
    assert "pick rank 1" in router.describe(router.pick_p2c(loads, rng), loads)


def test_gateway_routes_over_the_engines_by_their_loads(compose):
    """smg (power_of_two, polling /v1/loads) in front of two `loadsvc engine` services."""
    services = compose["services"]
    urls = []
    speeds = []
    for name in ("engine0", "engine1"):
        svc = services[name]
        args = loadsvc_args(svc["command"])
        assert args.command == "engine" and args.host == "0.0.0.0"
        assert {str(args.port), str(args.grpc_port)} == set(svc["expose"])
        assert f"127.0.0.1:{args.port}/health" in " ".join(svc["healthcheck"]["test"])
        urls.append(f"http://{name}:{args.port}")
        speeds.append(args.speeds)
    assert speeds[0] != speeds[1], "one engine is slower: the gateway has something to route around"
    gateway = services["gateway"]
    cmd = gateway["command"]
    assert cmd[:2] == ["smg", "launch"]
    for name in ("engine0", "engine1"):
        assert gateway["depends_on"][name]["condition"] == "service_healthy"
    smg = pytest.importorskip("smg.launch_router", reason="smg is in the test extra: pip install -e '.[test]'")
    args = smg.parse_router_args(cmd[2:])
    assert args.worker_urls == urls and args.policy == "power_of_two"
    assert args.load_monitor_interval == 1
    assert gateway["ports"] == [f"{args.port}:{args.port}"]
