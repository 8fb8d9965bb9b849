"""Run one job across several emulated nodes on this machine.

    python benchmarks/emulate.py --nodes N --per-node R [--rate 1gbit] [--transport mpi|torch] -- COMMAND...
    python benchmarks/emulate.py --cleanup

Each emulated node is a Linux network namespace with one interface, ``eth0``: one end
of a veth pair whose other end sits on a bridge in a namespace of its own, so the
root namespace's interfaces and routes are never touched. Node k (0-based) is
``nodek`` at 198.18.0.(k+1)/24 (198.18.0.0/15 is the range RFC 2544 reserves for
benchmarks, so it cannot clash with a real network). Every process of a node gets the
node's hostname (its own UTS namespace), the node's own /dev/shm, and an /etc/hosts
that names every node. ``--rate`` shapes each node's egress with
``tc qdisc replace dev eth0 root tbf rate RATE burst 256kb latency 50ms``.

COMMAND then runs as one job of N x R ranks, R on each node, ranks numbered node by
node. Every rank gets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, GROUP_RANK, GROUP_WORLD_SIZE, MASTER_ADDR = node 0,
MASTER_PORT) and GLOO_SOCKET_IFNAME=eth0.

- ``--transport mpi`` (default; ``fmcomm bench`` needs it, since the harness times
  through MPI): a real MPI job. mpiexec (``--mpiexec``, default the one beside this
  Python: MPICH's Hydra or Open MPI's) runs on a head namespace (``head``,
  198.18.0.254) and reaches every node through an ssh stand-in that enters the node's
  namespaces. Ranks also get MPI's own variables; UCX_TLS=tcp,self and
  UCX_NET_DEVICES=eth0 unless set (measured: without them MPICH's UCX all-reduced
  16 MiB between the nodes with 0 bytes on eth0); and FMCOMM_TRANSPORT=mpi unless
  set: with RANK present fmcomm would otherwise take the job for a torchrun job and
  use torch.distributed.
- ``--transport torch``: the ranks are started here, one process each, the way
  torchrun starts them.

Node membership is left to the hostname: nothing sets FMCOMM_NODE_ID.

The job's output passes through and its exit code is returned. Everything a run makes
(namespaces, hence its veths and bridge; /etc/netns/NAME; the per-node /dev/shm
directories; its state directory) carries the run's own prefix ``fmemu-XXXXXX`` and is
removed when the run ends, fails or is interrupted (SIGINT, SIGTERM, SIGHUP). A run
holds a lock for its lifetime; ``--cleanup`` removes what runs that no longer hold
theirs (crashed, SIGKILLed) left behind, and leaves live runs alone.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

RUN_PREFIX = "fmemu-"
RUN_ID_PATTERN = re.compile(r"^(fmemu-[0-9a-f]{6})-(?:bridge|head|node\d+)$")
STATE_ROOT = Path("/run/fmcomm-emulate")
NETNS_ETC = Path("/etc/netns")   # ip netns exec bind-mounts /etc/netns/NAME/* over /etc/*
SHM_ROOT = Path("/dev/shm")
SUBNET = "198.18.0"
HEAD_HOST = 254                  # the address of the head node that mpiexec runs on
MASTER_PORT = 29500              # torchrun's default; each run has namespaces of its own, so no clash
TBF_BURST, TBF_LATENCY = "256kb", "50ms"
STOP_GRACE_S = 5.0               # SIGTERM, then this long, then SIGKILL
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Run inside a node's namespaces before the real command (argv: hostname, shm dir,
# command...). ip netns exec has already given the process a mount namespace of its
# own (slave to the root's), so the bind mount stays private to it.
NODE_SETUP = 'hostname "$1" && mount --bind "$2" /dev/shm && shift 2 && exec "$@"'


def log(msg: str) -> None:
    print(f"emulate: {msg}", file=sys.stderr, flush=True)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_blocked():
    """Keep a second Ctrl-C from cutting the teardown short."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _die_with_parent() -> None:
    """preexec_fn: a rank (or mpiexec) gets SIGKILL if emulate.py itself is SIGKILLed."""
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# ------------------------------------------------------------------ run ownership

def run_lock_path(run_id: str) -> Path:
    return STATE_ROOT / f"{run_id}.lock"


def claim_run_id() -> tuple[str, int]:
    """A fresh run id and the open lock file that says the run is alive.

    The lock is an flock, so the kernel drops it when this process dies however it
    dies; --cleanup takes only runs whose lock it can take.
    """
    while True:
        run_id = RUN_PREFIX + secrets.token_hex(3)
        path = run_lock_path(run_id)
        STATE_ROOT.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except (FileExistsError, FileNotFoundError):  # taken, or another run just removed the empty STATE_ROOT
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        # A --cleanup that ran between the create and the flock may have unlinked the
        # file; a lock on an unlinked file protects nothing, so start again.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.write(fd, f"{os.getpid()}\n".encode())
                return run_id, fd
        os.close(fd)


def list_netns() -> list[str]:
    out = sh("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def stop_processes_in(netns: str) -> None:
    """SIGKILL what is still running in a namespace we made (daemons a job left behind)."""
    pids = sh("ip", "netns", "pids", netns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def remove_run(run_id: str) -> list[str]:
    """Remove everything run ``run_id`` made; return what was removed. Call with its lock held."""
    removed = []
    for netns in list_netns():
        if netns.startswith(run_id + "-"):
            stop_processes_in(netns)
            # Deleting a node's namespace destroys its eth0 and so the veth pair; deleting
            # the bridge's namespace destroys the bridge.
            if sh("ip", "netns", "delete", netns, check=False).returncode == 0:
                removed.append(f"netns {netns}")
    for root in (NETNS_ETC, SHM_ROOT, STATE_ROOT):
        for path in (root.glob(run_id + "-*") if root.exists() else []):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    state = STATE_ROOT / run_id
    if state.exists():
        shutil.rmtree(state, ignore_errors=True)
        removed.append(str(state))
    with contextlib.suppress(FileNotFoundError):
        run_lock_path(run_id).unlink()
    # The shared directories go too once nothing is left in them; rmdir fails on a
    # directory another run is using, which then keeps it.
    for shared in (NETNS_ETC, STATE_ROOT):
        with contextlib.suppress(OSError):
            shared.rmdir()
    return removed


def cleanup_leftovers() -> int:
    """--cleanup: remove what crashed runs left; runs that still hold their lock are alive."""
    run_ids = set()
    for netns in list_netns():
        m = RUN_ID_PATTERN.match(netns)
        if m:
            run_ids.add(m.group(1))
    for root in (NETNS_ETC, SHM_ROOT, STATE_ROOT):
        if root.exists():
            for path in root.glob(RUN_PREFIX + "*"):
                m = re.match(r"^(fmemu-[0-9a-f]{6})", path.name)
                if m:
                    run_ids.add(m.group(1))
    removed_any = False
    for run_id in sorted(run_ids):
        lock = run_lock_path(run_id)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except FileNotFoundError:  # no STATE_ROOT, so no live run holds a lock in it
            fd = None
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log(f"{run_id} is still running; left alone")
                    continue
            for what in remove_run(run_id):
                log(f"removed {what}")
                removed_any = True
        finally:
            if fd is not None:
                os.close(fd)
    if not removed_any:
        log("no leftovers")
    return 0


# ------------------------------------------------------------------ the cluster

class Cluster:
    """The namespaces, links and per-node files of one run.

    With ``head``, one more namespace, ``head`` (198.18.0.254), on the same bridge:
    mpiexec runs there, like on a login node. It reaches every node through the ssh
    stand-in, so all nodes are set up the same way (mpiexec on node 0 would start node
    0's ranks itself, and from inside node 0's private /dev/shm the others' could not
    be mounted).
    """

    def __init__(self, run_id: str, nodes: int, per_node: int, rate: str | None, head: bool = False):
        self.run_id, self.nodes, self.per_node, self.rate, self.head = run_id, nodes, per_node, rate, head
        self.state_dir = STATE_ROOT / run_id

    def netns(self, k: int) -> str:
        return f"{self.run_id}-node{k}"

    @property
    def bridge_netns(self) -> str:
        return f"{self.run_id}-bridge"

    @property
    def head_netns(self) -> str:
        return f"{self.run_id}-head"

    @staticmethod
    def hostname(k: int) -> str:
        return f"node{k}"

    @staticmethod
    def address(k: int) -> str:
        return f"{SUBNET}.{k + 1}"

    def shm_dir(self, k: int) -> Path:
        return SHM_ROOT / f"{self.netns(k)}-shm"

    def _add_host(self, netns: str, veth: str, address: str, hosts: str) -> None:
        br = self.bridge_netns
        sh("ip", "netns", "add", netns)
        # Made inside the bridge's namespace with the peer born inside the node's, so
        # no interface ever appears in the root namespace (and fixed names are safe).
        sh("ip", "-n", br, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        sh("ip", "-n", br, "link", "set", veth, "master", "br0", "up")
        sh("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")
        # Loopback is down in a new namespace; ranks of one node talk through it.
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        etc = NETNS_ETC / netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(hosts)

    def create(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        br = self.bridge_netns
        sh("ip", "netns", "add", br)
        sh("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", br, "link", "set", "br0", "up")
        names = [(self.address(k), self.hostname(k)) for k in range(self.nodes)]
        if self.head:
            names.append((f"{SUBNET}.{HEAD_HOST}", "head"))
        # The IPv4-mapped forms too: torch's TCPStore listens on an IPv6 socket and
        # looks its clients' ::ffff:198.18.0.x up by address ("hostname of the client
        # socket cannot be retrieved" otherwise).
        hosts = "127.0.0.1 localhost\n::1 localhost\n" + "".join(
            f"{addr} {name}\n::ffff:{addr} {name}\n" for addr, name in names)
        if self.head:
            self._add_host(self.head_netns, "veth-head", f"{SUBNET}.{HEAD_HOST}", hosts)
        for k in range(self.nodes):
            ns = self.netns(k)
            self._add_host(ns, f"veth{k}", self.address(k), hosts)
            if self.rate:
                sh("tc", "-n", ns, "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", self.rate,
                   "burst", TBF_BURST, "latency", TBF_LATENCY)
            self.shm_dir(k).mkdir(exist_ok=True)
            os.chmod(self.shm_dir(k), 0o1777)  # what /dev/shm itself has

    def on_node(self, k: int, argv: list[str]) -> list[str]:
        """argv run as a process of node k: its network, hostname and /dev/shm."""
        # ip netns exec also remounts /sys (so /sys/class/net/eth0 is the node's) and
        # puts /etc/netns/NAME/hosts over /etc/hosts. unshare --uts gives the hostname
        # a namespace of its own: MPI and fmcomm tell nodes apart by hostname.
        return ["ip", "netns", "exec", self.netns(k), "unshare", "--uts", "sh", "-c", NODE_SETUP,
                "node-setup", self.hostname(k), str(self.shm_dir(k)), *argv]

    def on_head(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.head_netns, "unshare", "--uts", "sh", "-c",
                'hostname head && exec "$@"', "head-setup", *argv]

    def link_bytes(self) -> list[tuple[int, int]]:
        """(sent, received) bytes of each node's eth0 so far."""
        out = []
        for k in range(self.nodes):
            link = json.loads(sh("ip", "-n", self.netns(k), "-s", "-j", "link", "show", "dev", "eth0").stdout)[0]
            stats = link.get("stats64") or link.get("stats")
            out.append((int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])))
        return out


# ------------------------------------------------------------------ the job

# Where this process stands in some other job; a rank must not inherit it (fmcomm and
# torch would read it before what this job sets).
INHERITED_PLACEMENT = re.compile(
    r"^(RANK|LOCAL_RANK|GROUP_RANK|ROLE_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|GROUP_WORLD_SIZE|ROLE_WORLD_SIZE"
    r"|PMI_.*|PMIX_.*|OMPI_COMM_WORLD_.*|MPI_LOCALRANKID|MPI_LOCALNRANKS|SLURM_.*|TORCHELASTIC_.*)$")


def job_environment(cluster: Cluster, transport: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not INHERITED_PLACEMENT.match(k)}
    # The venv's fmcomm, python and mpiexec come first, as they do for `fmcomm bench -n`.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update({
        "WORLD_SIZE": str(cluster.nodes * cluster.per_node),
        "LOCAL_WORLD_SIZE": str(cluster.per_node),
        "GROUP_WORLD_SIZE": str(cluster.nodes),
        "MASTER_ADDR": cluster.address(0),
        "MASTER_PORT": str(MASTER_PORT),
        "GLOO_SOCKET_IFNAME": "eth0",
    })
    # One compute thread per rank's share of the cores, as `fmcomm bench -n` does:
    # spinning OpenMP threads steal the cores the peers of a collective need.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (cluster.nodes * cluster.per_node))))
    if transport == "mpi":
        # UCX (MPICH's netmod) takes shared memory or CMA to any peer it believes
        # reachable that way; restricted to TCP on eth0, inter-node bytes cross the link.
        env.setdefault("UCX_TLS", "tcp,self")
        env.setdefault("UCX_NET_DEVICES", "eth0")
        env.setdefault("FMCOMM_TRANSPORT", "mpi")
    return env


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group still running, then SIGKILL after a grace period."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in live:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.0, deadline - time.monotonic()))
    for p in live:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128+N, as a shell says


def spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    # A session of its own: the job can be stopped as a whole (killpg) and a Ctrl-C
    # reaches emulate.py alone, which then stops the job in order.
    return subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_die_with_parent)


def run_torch_job(cluster: Cluster, command: list[str], env: dict[str, str], procs: list) -> int:
    """One process per rank, started the way torchrun starts them; the first failure stops the rest."""
    where = []
    for k in range(cluster.nodes):
        for local in range(cluster.per_node):
            rank = k * cluster.per_node + local
            rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(local), GROUP_RANK=str(k),
                            ROLE_RANK=str(rank), ROLE_WORLD_SIZE=env["WORLD_SIZE"])
            procs.append(spawn(cluster.on_node(k, command), rank_env))
            where.append((rank, k))
    while True:
        running = False
        for p, (rank, k) in zip(procs, where):
            code = p.poll()
            if code is None:
                running = True
            elif code != 0:
                log(f"rank {rank} on {cluster.hostname(k)} exited with {exit_code(code)}; stopping the others")
                stop(procs)
                return exit_code(code)
        if not running:
            return 0
        time.sleep(0.05)


RANK_ENV_SCRIPT = """#!/bin/sh
# What torchrun would give this rank, from what the MPI launcher gave it
# (Open MPI's names, else MPICH Hydra's).
RANK=${OMPI_COMM_WORLD_RANK:-$PMI_RANK}
LOCAL_RANK=${OMPI_COMM_WORLD_LOCAL_RANK:-$MPI_LOCALRANKID}
node=$(hostname)
GROUP_RANK=${node#node}
ROLE_RANK=$RANK
ROLE_WORLD_SIZE=$WORLD_SIZE
export RANK LOCAL_RANK GROUP_RANK ROLE_RANK ROLE_WORLD_SIZE
exec "$@"
"""


def launcher_script(cluster: Cluster) -> str:
    """The ssh stand-in mpiexec is given: `launcher [ssh options] HOST COMMAND...`."""
    cases = "".join(f"  {cluster.hostname(k)}) ns={cluster.netns(k)}; shm={cluster.shm_dir(k)};;\n"
                    for k in range(cluster.nodes))
    return f"""#!/bin/sh
# ssh stand-in for mpiexec: runs COMMAND on emulated node HOST, in its namespaces.
while [ $# -gt 0 ]; do
  case "$1" in
    -o|-p|-l|-i|-F) shift 2;;
    -*) shift;;
    *) break;;
  esac
done
host=$1; shift
case "$host" in
{cases}  *) echo "emulate launcher: no emulated node named $host" >&2; exit 255;;
esac
# Like ssh, the command arrives as words for a shell to read: sh -c "$*".
exec ip netns exec "$ns" unshare --uts sh -c 'hostname "$1" && mount --bind "$2" /dev/shm && exec sh -c "$3"' \\
  node-setup "$host" "$shm" "$*"
"""


def find_mpiexec() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(here, os.X_OK):
        return here
    return shutil.which("mpiexec") or shutil.which("mpirun")


def mpi_flavor(mpiexec: str) -> str:
    out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in out or "OpenRTE" in out or "PRRTE" in out:
        return "openmpi"
    if "HYDRA" in out or "MPICH" in out:
        return "mpich"
    raise RuntimeError(f"{mpiexec}: neither MPICH's Hydra nor Open MPI:\n{out[:500]}")


def write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def run_mpi_job(cluster: Cluster, command: list[str], env: dict[str, str], procs: list, mpiexec: str) -> int:
    """mpiexec on the head node, every node reached through the ssh stand-in."""
    flavor = mpi_flavor(mpiexec)
    launcher = write_executable(cluster.state_dir / "launcher", launcher_script(cluster))
    rank_env = write_executable(cluster.state_dir / "rank-env", RANK_ENV_SCRIPT)
    nranks = str(cluster.nodes * cluster.per_node)
    hostfile = cluster.state_dir / "hostfile"
    if flavor == "mpich":
        hostfile.write_text("".join(f"{cluster.hostname(k)}:{cluster.per_node}\n" for k in range(cluster.nodes)))
        argv = [mpiexec, "-launcher", "ssh", "-launcher-exec", str(launcher), "-f", str(hostfile),
                "-n", nranks, str(rank_env), *command]
    else:
        hostfile.write_text("".join(f"{cluster.hostname(k)} slots={cluster.per_node}\n"
                                    for k in range(cluster.nodes)))
        env = dict(env, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        # Defaults the caller's OMPI_MCA_* variables override: TCP on eth0 between nodes,
        # shared memory within one (ob1, so no UCX to find another way between nodes);
        # oversubscribed ranks yield instead of busy-polling (MACHINE_NOTES: 8 ms -> 72 us).
        for name, value in (("pml", "ob1"), ("btl", "tcp,sm,self"), ("btl_tcp_if_include", "eth0"),
                            ("mpi_yield_when_idle", "1")):
            env.setdefault(f"OMPI_MCA_{name}", value)
        # Open MPI forwards only what -x names; ranks also inherit the launcher's
        # environment here, but a real cluster would not give them that.
        forwarded = [v for v in ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                 "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME",
                                 "OMP_NUM_THREADS", "FMCOMM_TRANSPORT") if v in env]
        forwarded += [v for v in env if v.startswith(("FMCOMM_", "OMPI_MCA_")) and v not in forwarded]
        argv = [mpiexec, "--hostfile", str(hostfile), "-np", nranks, "--map-by", "slot", "--oversubscribe",
                "--mca", "plm_ssh_agent", str(launcher),
                # The daemons' out-of-band channel on eth0: the nodes reach each other nowhere else.
                "--mca", "oob_tcp_if_include", "eth0",
                *[a for v in forwarded for a in ("-x", v)], str(rank_env), *command]
    procs.append(spawn(cluster.on_head(argv), env))
    return exit_code(procs[0].wait())


# ------------------------------------------------------------------ main

def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="emulate.py", usage="%(prog)s --nodes N --per-node R [--rate RATE] [--transport mpi|torch] -- COMMAND..."
                                 "\n       %(prog)s --cleanup",
        description="Run COMMAND as one job of N x R ranks across N emulated nodes (network namespaces "
                    "on a private bridge, each with its own hostname and /dev/shm). Needs root.")
    p.add_argument("--nodes", type=int, help="number of emulated nodes")
    p.add_argument("--per-node", type=int, help="ranks on each node")
    p.add_argument("--rate", default=None, help="shape each node's eth0 egress with tbf at this rate (tc syntax: 1gbit, 100mbit)")
    p.add_argument("--transport", choices=["mpi", "torch"], default="mpi",
                   help="mpi: one mpiexec job across the nodes (default); torch: ranks started here, torchrun-style")
    p.add_argument("--mpiexec", default=None, help="mpiexec to use for --transport mpi (default: the one beside this python)")
    p.add_argument("--cleanup", action="store_true", help="remove what crashed runs left behind, then exit")
    if "--" in argv:
        split = argv.index("--")
        options, command = argv[:split], argv[split + 1:]
    else:
        options, command = argv, []
    args = p.parse_args(options)
    if not args.cleanup:
        if args.nodes is None or args.per_node is None or not command:
            p.error("--nodes, --per-node and `-- COMMAND...` are required (or --cleanup)")
        if not 1 <= args.nodes < HEAD_HOST:
            p.error(f"--nodes must be 1..{HEAD_HOST - 1} (one /24 of addresses, .{HEAD_HOST} is the head)")
        if args.per_node < 1:
            p.error("--per-node must be at least 1")
    return args, command


def check_host() -> str | None:
    """Why this machine cannot run the emulation, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, tc); run it as root"
    for tool in ("ip", "unshare", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (iproute2, util-linux)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` does not work here"
    return None


def main(argv: list[str] | None = None) -> int:
    args, command = parse_args(list(sys.argv[1:] if argv is None else argv))
    problem = check_host()
    if problem:
        log(problem)
        return 2
    if args.cleanup:
        return cleanup_leftovers()
    mpiexec = None
    if args.transport == "mpi":
        mpiexec = args.mpiexec or find_mpiexec()
        if mpiexec is None:
            log("--transport mpi needs mpiexec (pip install mpi4py mpich)")
            return 2

    if args.transport == "torch" and os.path.basename(command[0]) == "fmcomm" and "bench" in command[1:2]:
        log("warning: fmcomm bench synchronises its timing through MPI; run it with --transport mpi")

    # Killed before the handlers are in place, a run leaves only its lock file, which
    # --cleanup removes; from here on every exit goes through the finally below.
    run_id, lock_fd = claim_run_id()
    for signum in HANDLED_SIGNALS:
        signal.signal(signum, _raise_interrupted)
    cluster = Cluster(run_id, args.nodes, args.per_node, args.rate, head=args.transport == "mpi")
    procs: list[subprocess.Popen] = []
    code = 1
    try:
        cluster.create()
        log(f"{run_id}: {args.nodes} nodes x {args.per_node} ranks, link {args.rate or 'unshaped'}, "
            f"transport {args.transport}")
        before = cluster.link_bytes()
        env = job_environment(cluster, args.transport)
        if args.transport == "mpi":
            code = run_mpi_job(cluster, command, env, procs, mpiexec)
        else:
            code = run_torch_job(cluster, command, env, procs)
        after = cluster.link_bytes()
        for k, ((tx0, rx0), (tx1, rx1)) in enumerate(zip(before, after)):
            log(f"{cluster.hostname(k)} eth0: sent {(tx1 - tx0) / 2**20:.1f} MiB, received {(rx1 - rx0) / 2**20:.1f} MiB")
    except Interrupted as e:
        log(f"{e}: stopping the job")
        code = 128 + e.signum
    except (RuntimeError, OSError) as e:
        log(str(e))
        code = 1
    finally:
        with signals_blocked():
            stop(procs)
            remove_run(run_id)
            os.close(lock_fd)
    return code


if __name__ == "__main__":
    sys.exit(main())
