"""A Ray cluster of several nodes on this machine, on loopback: for development and the integration tests.

    python -m orchestrator.local_cluster up [--dir DIR] [--nodes node_a node_b] [--cpus 1]
    eval "$(python -m orchestrator.local_cluster env --dir DIR)"   # RAY_AUTH_MODE and RAY_AUTH_TOKEN for clients
    python -m orchestrator.local_cluster down --dir DIR

Each node is a plain `ray start` (the first with `--head`) with its own ports, its own temp dir under DIR, a
few CPUs and one custom resource named after it (`{"node_a": 1}`), so a test can tell the nodes apart and
ask for a resource no node has. The dashboard and the Jobs API listen on 127.0.0.1. Ray's gRPC services
(GCS, raylets, object managers) listen on every interface, and Ray replaces a loopback --node-ip-address
with the host's address, so they cannot be kept to loopback; the token guards them.

Token authentication is on: `up` writes a fresh token to DIR/auth_token and starts every node with
RAY_AUTH_MODE=token and RAY_AUTH_TOKEN set (Ray reads RAY_AUTH_MODE from the environment of every node;
KubeRay's authOptions does the same). Clients pass the token the same way: `env` prints the variables.

`down` ends only this cluster's processes: those whose command line names one of its temp dirs, and their
children (Ray's workers and job drivers). `ray stop` would end every Ray on the machine, other users' too.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

STATE_FILE = "cluster.json"


@dataclass
class LocalCluster:
    root: Path
    """Holds each node's temp dir, the token and cluster.json."""
    gcs_address: str
    """For `ray.init(address=...)`, `flotilla train --address`: 127.0.0.1:PORT."""
    dashboard_url: str
    """The dashboard and Jobs API, for `flotilla submit --address`: http://127.0.0.1:PORT."""
    token: str
    nodes: list[str]
    """The custom resource each node carries, head first."""

    def client_env(self) -> dict[str, str]:
        """What a client of this cluster sets (on top of its own environment)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def save(self) -> None:
        (self.root / STATE_FILE).write_text(json.dumps({**asdict(self), "root": str(self.root)}, indent=1))

    @classmethod
    def load(cls, root: Path) -> LocalCluster:
        data = json.loads((Path(root) / STATE_FILE).read_text())
        return cls(**{**data, "root": Path(data["root"])})


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together, so no two are the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ray() -> str:
    return str(Path(sys.executable).parent / "ray")


def _node_args(name: str, cpus: float, temp_dir: Path) -> list[str]:
    manager, objects, agent, agent_grpc, runtime_env, metrics = _free_ports(6)
    # One machine, several raylets: every per-node port with a fixed default (the dashboard agent's 52365, the
    # metrics port, ...) must differ between them; worker ports 0 let each worker take one the OS picks.
    return ["--num-cpus", str(cpus), "--num-gpus", "0",
            "--resources", json.dumps({name: 1}), "--temp-dir", str(temp_dir),
            "--node-manager-port", str(manager), "--object-manager-port", str(objects),
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
            "--min-worker-port", "0", "--max-worker-port", "0",
            "--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]


def start(root: Path | None = None, nodes: tuple[str, ...] = ("node_a", "node_b"), cpus: float = 1,
          env: dict[str, str] | None = None, timeout: float = 120) -> LocalCluster:
    """Start a head (the first node name) and one more node per further name; returns when all are up.

    `env` is the environment the nodes (and so the jobs they run) start with; PATH gets this Python's
    bin/ in front, so a job's `flotilla` entrypoint is this installation's.
    """
    root = Path(root or tempfile.mkdtemp(prefix="flotilla-ray-"))
    root.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    (root / "auth_token").write_text(token)
    (root / "auth_token").chmod(0o600)
    node_env = {**(env if env is not None else os.environ), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    node_env.pop("RAY_ADDRESS", None)
    node_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{node_env.get('PATH', '')}"
    gcs, dashboard, client = _free_ports(3)
    cluster = LocalCluster(root, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", token, list(nodes))
    cluster.save()  # before anything starts, so `down` finds what a failed `up` left
    try:
        head = [_ray(), "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
                *_node_args(nodes[0], cpus, root / nodes[0])]
        _run(head, node_env, timeout)
        for name in nodes[1:]:
            _run([_ray(), "start", "--address", cluster.gcs_address, *_node_args(name, cpus, root / name)],
                 node_env, timeout)
        _wait_for_nodes(cluster, node_env, timeout)
    except BaseException:
        stop(root)
        raise
    return cluster


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"`{shlex.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def _wait_for_nodes(cluster: LocalCluster, env: dict[str, str], timeout: float) -> None:
    """Wait until the GCS counts every node alive (a joining raylet registers a moment after `ray start`)."""
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.monotonic() + timeout
    alive = "0"
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", probe, cluster.gcs_address], env=env, capture_output=True,
                             text=True, timeout=timeout)
        alive = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "?"
        if alive == str(len(cluster.nodes)):
            return
        time.sleep(1)
    raise RuntimeError(f"local Ray cluster at {cluster.gcs_address}: {alive} of {len(cluster.nodes)} nodes alive "
                       f"after {timeout:.0f}s; logs under {cluster.root}/*/session_latest/logs")


def processes(root: Path) -> list[psutil.Process]:
    """This cluster's processes: any naming its root in its command line (the Ray client server names only
    the GCS address, whose port is this cluster's), and all their descendants."""
    marker = str(Path(root).resolve())
    state = Path(root) / STATE_FILE
    gcs_port = LocalCluster.load(root).gcs_address.rsplit(":", 1)[1] if state.exists() else None

    def ours(arg: str) -> bool:
        return marker in arg or (gcs_port is not None and arg.startswith("--address=") and arg.endswith(f":{gcs_port}"))

    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and any(ours(arg) for arg in proc.info["cmdline"] or ()):
                found[proc.pid] = proc
                found |= {child.pid: child for child in proc.children(recursive=True)}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def stop(root: Path, grace: float = 5) -> int:
    """End this cluster's processes (SIGTERM, then SIGKILL after `grace` s); returns how many there were."""
    procs = processes(root)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)
    return len(procs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orchestrator.local_cluster", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the cluster; prints its addresses")
    up.add_argument("--dir", type=Path, help="where its temp dirs and token go (default: a new /tmp/flotilla-ray-*)")
    up.add_argument("--nodes", nargs="+", default=["node_a", "node_b"], help="one custom resource per node, head first")
    up.add_argument("--cpus", type=float, default=1, help="CPUs each node offers")
    for name, text in (("env", "print export lines for a client of the cluster"), ("down", "stop the cluster")):
        sub.add_parser(name, help=text).add_argument("--dir", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.command == "up":
        if args.dir and len(str(args.dir.resolve())) > 60:
            ap.error(f"--dir {args.dir}: keep it short (Ray's Unix sockets live under it; their paths are capped at 107 bytes)")
        c = start(args.dir, tuple(args.nodes), args.cpus)
        print(f"Ray cluster of {len(c.nodes)} nodes ({', '.join(c.nodes)}) under {c.root}\n"
              f"  Jobs API and dashboard: {c.dashboard_url}\n  GCS: {c.gcs_address}\n"
              f"  client environment: eval \"$(python -m orchestrator.local_cluster env --dir {c.root})\"\n"
              f"  stop: python -m orchestrator.local_cluster down --dir {c.root}")
    elif args.command == "env":
        c = LocalCluster.load(args.dir)
        for key, value in c.client_env().items():
            print(f"export {key}={shlex.quote(value)}")
    else:
        print(f"stopped {stop(args.dir)} processes of the cluster under {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
