"""A throw-away SLURM cluster on this one machine, for tests: munged, slurmctld and two slurmd.

`LocalSlurm.start()` writes a private munge key and a minimal `slurm.conf` (no cgroups, no accounting, free
ports, every file under one temp directory), starts the daemons in the foreground as children of this process
and waits until the nodes are idle. Two slurmd emulate two nodes on this host (Debian builds slurmd with
multiple-slurmd support), named after two host names that resolve to this machine (its short host name and
`localhost`), so a `--nodes=2` job's head node resolves without touching /etc/hosts. `stop()` cancels every
job, stops the daemons, kills any process left from a job and removes the directory; the daemons also die
with this process (PR_SET_PDEATHSIG), so an interrupted test session leaves none behind.

Needs root (slurmd launches jobs as their user) and Debian's `slurmctld slurmd slurm-client munge`.
`unavailable_reason()` says why a cluster cannot start here; tests skip with that reason.

Things that bite (checked on Debian 12, Slurm 22.05):
- munged refuses a socket directory that is not mode 755, and a key file readable by others.
- A cgroup plugin without cgroup.conf makes jobs fail to launch while the job can still end COMPLETED:
  tests check a job's output files, never only its state.
- `scontrol requeue` delays the job's next start by the job credential lifetime (`cred_expire`, 120 s by
  default) so that nodes forget the old job's revoked credential first, and the builtin scheduler may only
  look again a minute later. Starting it before the credential expired (StartTime=now at once) sometimes
  fails with "Job credential revoked" and the job ends FAILED. Here `cred_expire=10`, and
  `wait_job(release=True)` sets StartTime=now once that has passed.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from megatron_moe.parallel import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
CRED_EXPIRE_S = 10  # job credential lifetime, which is also the requeue delay
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", ""}
"""Job states after which a job will not run again ('' = the controller forgot it)."""
MARKER = "MEGATRON_MOE_SLURM_FIXTURE"
"""Environment variable naming the fixture directory; every process the cluster starts inherits it."""


def _die_with_parent() -> None:
    """preexec_fn: the daemon gets SIGTERM when the process that started it exits (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setsid()


def _resolves_here(name: str) -> bool:
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)}
    except OSError:
        return False
    return any(a.startswith("127.") for a in addrs)


def node_names() -> list[str]:
    """Two names for the emulated nodes that resolve to this host, or one when only one does."""
    host = socket.gethostname().split(".")[0]
    names = [n for n in dict.fromkeys([host, "localhost"]) if _resolves_here(n)]
    return names or ["localhost"]


def unavailable_reason() -> str | None:
    """Why a local SLURM cannot start here, or None."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        return (f"SLURM/munge not installed ({', '.join(missing)} missing; "
                "apt-get install slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        return "a local SLURM needs root (slurmd starts jobs as their user)"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    """A private SLURM cluster; use as a context manager or call start()/stop()."""

    def __init__(self, root: str | Path | None = None, partition: str = "debug"):
        self.owns_root = root is None  # a temp directory of ours: removed by stop()
        self.root = Path(root or tempfile.mkdtemp(prefix="mmoe-slurm-"))
        self.partition = partition
        self.nodes = node_names()
        self.conf = self.root / "etc" / "slurm.conf"
        self.procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (sbatch, squeue, ...) and everything they start."""
        return {**os.environ, "SLURM_CONF": str(self.conf), MARKER: str(self.root)}

    # ------------------------------------------------------------ start

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs.append(subprocess.Popen([_which(args[0]), *args[1:]], stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, env=self.env, preexec_fn=_die_with_parent))
        log.close()

    def _write_conf(self) -> None:
        # A random first job id: jobs derive their rendezvous port from it, and two test sessions may run at once.
        cpus = os.cpu_count() or 1
        r = self.root
        if len(self.nodes) == 1:
            node_lines = [f"NodeName={self.nodes[0]} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN"]
        else:
            host = socket.gethostname().split(".")[0]
            node_lines = [
                f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} CPUs={cpus} State=UNKNOWN"
                for n in self.nodes
            ]
        conf = f"""\
ClusterName=mmoe{os.getpid()}
FirstJobId={random.randrange(1000, 1_000_000)}
SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket.2,cred_expire={CRED_EXPIRE_S}
StateSaveLocation={r}/spool/ctld
SlurmdSpoolDir={r}/spool/d/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
Waittime=0
MailProg=/bin/true
{chr(10).join(node_lines)}
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        self.conf.write_text(conf)

    def start(self, timeout: float = 60) -> "LocalSlurm":
        r = self.root
        for sub in ("etc", "munge", "log", "run", "spool/ctld", *(f"spool/d/{n}" for n in self.nodes)):
            (r / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(r, 0o755)
        os.chmod(r / "munge", 0o755)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._write_conf()
        try:
            self._spawn("munged", "munged", "--foreground", f"--key-file={key}", f"--socket={r}/munge/munge.socket.2",
                        f"--pid-file={r}/munge/munged.pid", f"--log-file={r}/log/munged.log",
                        f"--seed-file={r}/munge/munged.seed")
            self._wait(lambda: (r / "munge" / "munge.socket.2").exists(), 10, "munged did not create its socket")
            self._spawn("slurmctld", "slurmctld", "-D", "-c", "-f", str(self.conf))
            for n in self.nodes:
                self._spawn(f"slurmd-{n}", "slurmd", "-D", "-N", n, "-f", str(self.conf))
            self._wait(self._all_idle, timeout, "nodes did not become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"local SLURM: {', '.join(dead)} exited; logs:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"local SLURM: {what} within {timeout:.0f} s; logs:\n{self.logs()}")

    def _all_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-t", "idle", "-o", "%N", check=False).stdout.split()
        return len(set(out)) >= len(self.nodes)

    # ------------------------------------------------------------ use

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        proc = subprocess.run([_which(cmd[0]), *cmd[1:]], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job_state(self, job_id: str) -> str:
        """PENDING, RUNNING, COMPLETED, ... ('' when the controller no longer knows the job)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return ""

    def wait_job(self, job_id: str, timeout: float = 120, release: bool = False) -> str:
        """Wait until the job has ended; returns its final state. `release`: start a requeued (PENDING) job
        as soon as its old credential has expired instead of at the scheduler's next look."""
        deadline = time.monotonic() + timeout
        pending_since = None
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in ENDED:
                return state
            if release and state == "PENDING":
                pending_since = pending_since or time.monotonic()
                if time.monotonic() - pending_since > CRED_EXPIRE_S + 2:
                    self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now", check=False)
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout:.0f} s; logs:\n{self.logs()}")

    def drained(self) -> str:
        """`sinfo -R`: nodes down or drained, with the reason (empty when healthy)."""
        return self.run("sinfo", "-h", "-R", check=False).stdout.strip()

    def logs(self, lines: int = 20) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(out)

    # ------------------------------------------------------------ stop

    def stop(self) -> None:
        """Cancel jobs, stop the daemons, kill whatever a job left behind. Safe to call twice."""
        if self.procs and all(p.poll() is None for p in self.procs):
            jobs = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if jobs:
                self.run("scancel", "--full", *sorted(set(jobs)), check=False)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                    time.sleep(0.2)
        for p in reversed(self.procs):  # slurmd, slurmctld, then munged
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        self._kill_leftovers()
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """Kill processes that carry this cluster's marker in their environment (slurmstepd, job tasks)."""
        tag = f"{MARKER}={self.root}".encode()
        me = os.getpid()
        for _ in range(3):
            found = []
            for d in Path("/proc").iterdir():
                if not d.name.isdigit() or int(d.name) == me:
                    continue
                try:
                    if tag in (d / "environ").read_bytes().split(b"\0"):
                        found.append(int(d.name))
                except OSError:
                    continue
            if not found:
                return
            for pid in found:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
