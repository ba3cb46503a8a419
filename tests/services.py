"""Real services for the cluster tests, started on loopback on this machine and stopped after:
a one-node SLURM cluster (munge, MariaDB for slurmdbd so that `sacct` works, slurmctld,
slurmd), PostgreSQL, and `mlflow server` on it. Each start raises Unavailable, with the
reason, where the service cannot run here; the fixtures turn that into a skip."""

from __future__ import annotations

import getpass
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

# The SLURM job-step plugin drops SLURM_CONF from the environment of the step it starts, so
# the step's srun finds the config only at the default path. A test cluster therefore writes
# its config there, and only where no real cluster's config is (MARKER tells ours apart).
SLURM_ETC = Path("/etc/slurm")
MARKER = "# klbench one-node test cluster (tests/services.py); removed when the tests end\n"
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")  # where slurmdbd's clients look for munge


class Unavailable(Exception):
    """The service cannot run on this machine (missing package, not root, port in use...)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, log: Path | None = None):
    """predicate()'s first truthy value within timeout seconds; else Unavailable naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (OSError, subprocess.SubprocessError):
            value = None
        if value:
            return value
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-1500:] if log is not None and log.exists() else ""
    raise Unavailable(f"{what} did not come up within {timeout:.0f} s{': ' + tail if tail else ''}")


def _need(*programs: str) -> dict[str, str]:
    found = {p: shutil.which(p) or shutil.which(p, path="/usr/sbin:/sbin:/usr/bin") for p in programs}
    missing = [p for p, path in found.items() if path is None]
    if missing:
        raise Unavailable(f"{', '.join(missing)} not installed (Debian: apt-get install slurm-wlm slurmdbd munge "
                          "mariadb-server postgresql; .ci/run installs them)")
    return found


def _run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)


def _kill_pidfile(path: Path, sig: int = signal.SIGTERM) -> None:
    try:
        os.kill(int(path.read_text().strip()), sig)
    except (OSError, ValueError):
        pass


# --- SLURM ---------------------------------------------------------------------------------


class SlurmCluster:
    """slurmctld + slurmd on this machine (one node, loopback), with slurmdbd on a private
    MariaDB so that jobs go through accounting and `sacct` can report them."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="klbench-slurm-"))
        self.log = self.root / "log"
        self._pidfiles: list[Path] = []
        self._written: list[Path] = []
        self._munged = False

    def start(self) -> "SlurmCluster":
        bins = _need("munged", "mungekey", "mariadbd", "mariadb-install-db", "mariadb", "slurmdbd", "slurmctld",
                     "slurmd", "sacctmgr", "sacct", "sinfo")
        if os.geteuid() != 0:
            raise Unavailable("a SLURM node (slurmd) needs root to start jobs")
        for name in ("slurm.conf", "slurmdbd.conf"):
            path = SLURM_ETC / name
            if path.exists() and not path.read_text().startswith(MARKER):
                raise Unavailable(f"{path} belongs to a real SLURM installation; not replacing it")
        for sub in ("state", "spool", "log", "db", "munge"):
            (self.root / sub).mkdir()
        try:
            self._start_munge(bins)
            self._start_database(bins)
            self._write_configs()
            self._start(bins["slurmdbd"], pidfile=self.root / "slurmdbd.pid", log=self.log / "slurmdbd.log",
                        ready=lambda: _run(bins["sacctmgr"], "-n", "list", "cluster").returncode == 0,
                        what="slurmdbd")
            for command in (["add", "cluster", "klbench"], ["add", "account", "klbench"],
                            ["add", "user", getpass.getuser(), "account=klbench"]):
                _run(bins["sacctmgr"], "-i", *command)
            self._start(bins["slurmctld"], pidfile=self.root / "slurmctld.pid", log=self.log / "slurmctld.log",
                        ready=lambda: _run(bins["sinfo"]).returncode == 0, what="slurmctld")
            self._start(bins["slurmd"], pidfile=self.root / "slurmd.pid", log=self.log / "slurmd.log",
                        ready=lambda: "idle" in _run(bins["sinfo"], "-h", "-o", "%T").stdout, what="slurmd")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self, bins: dict[str, str]) -> None:
        if MUNGE_SOCKET.exists() and _run("sh", "-c", "munge -n | unmunge").returncode == 0:
            return  # the machine's munged: slurm uses it as any cluster would
        key = self.root / "munge" / "munge.key"
        _run(bins["mungekey"], "-c", "-k", str(key))
        key.chmod(0o600)
        MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        pidfile = self.root / "munge" / "munged.pid"
        result = _run(bins["munged"], f"--key-file={key}", f"--pid-file={pidfile}", "--force",
                      f"--log-file={self.root / 'munge' / 'munged.log'}", f"--seed-file={self.root / 'munge' / 'seed'}")
        if result.returncode != 0:
            raise Unavailable(f"munged did not start: {result.stderr.strip()[-300:]}")
        self._pidfiles.append(pidfile)
        self._munged = True

    def _start_database(self, bins: dict[str, str]) -> None:
        self.db_port = free_port()
        result = _run(bins["mariadb-install-db"], "--user=root", f"--datadir={self.root / 'db'}",
                      "--auth-root-authentication-method=normal", "--skip-test-db")
        if result.returncode != 0:
            raise Unavailable(f"mariadb-install-db failed: {result.stderr.strip()[-300:]}")
        socket_path = self.root / "mysql.sock"
        self._start(bins["mariadbd"], "--user=root", f"--datadir={self.root / 'db'}", f"--socket={socket_path}",
                    "--bind-address=127.0.0.1", f"--port={self.db_port}", f"--pid-file={self.root / 'mysql.pid'}",
                    f"--log-error={self.log / 'mysql.log'}", background=True, pidfile=self.root / "mysql.pid",
                    log=self.log / "mysql.log", ready=socket_path.exists, what="MariaDB")
        sql = ("CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; CREATE DATABASE slurm_acct_db; "
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
        result = _run(bins["mariadb"], f"--socket={socket_path}", "-uroot", "-e", sql)
        if result.returncode != 0:
            raise Unavailable(f"MariaDB refused the accounting database: {result.stderr.strip()[-300:]}")

    def _write_configs(self) -> None:
        self.ctld_port, self.slurmd_port, self.dbd_port = free_port(), free_port(), free_port()
        host = socket.gethostname()
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        cpus = os.cpu_count() or 1
        user = getpass.getuser()
        r = self.root
        slurm = f"""{MARKER}ClusterName=klbench
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={self.dbd_port}
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MinJobAge=600
ReturnToService=2
MpiDefault=none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={max(memory - 1024, 1024)} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
        dbd = f"""{MARKER}AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort={self.dbd_port}
SlurmUser={user}
LogFile={r}/log/slurmdbd.log
PidFile={r}/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.db_port}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
"""
        SLURM_ETC.mkdir(parents=True, exist_ok=True)
        for name, text in (("slurm.conf", slurm), ("slurmdbd.conf", dbd)):
            path = SLURM_ETC / name
            path.write_text(text)
            path.chmod(0o600 if name == "slurmdbd.conf" else 0o644)
            self._written.append(path)

    def _start(self, program: str, *args: str, pidfile: Path, log: Path, ready, what: str,
               background: bool = False) -> None:
        """Start a daemon (it forks itself, or runs `background`), then wait until `ready()`."""
        if background:
            subprocess.Popen([program, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        else:
            result = _run(program, *args)
            if result.returncode != 0:
                raise Unavailable(f"{what} did not start: {(result.stderr or result.stdout).strip()[-500:]}")
        self._pidfiles.append(pidfile)
        wait_until(ready, 60, what, log)

    def sacct(self, *args: str) -> list[list[str]]:
        result = _run(shutil.which("sacct") or "sacct", "-X", "-n", "-P", *args)
        return [line.split("|") for line in result.stdout.splitlines() if line]

    def stop(self) -> None:
        for pidfile in reversed(self._pidfiles):
            _kill_pidfile(pidfile)
        time.sleep(1)
        for pidfile in reversed(self._pidfiles):
            _kill_pidfile(pidfile, signal.SIGKILL)
        for path in self._written:
            path.unlink(missing_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)


# --- PostgreSQL and mlflow server ------------------------------------------------------------


class Postgres:
    """A private PostgreSQL cluster on 127.0.0.1, run as the `postgres` user (it refuses root)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="klbench-pg-"))
        self.port = free_port()
        self.bin: Path | None = None
        self._as_postgres: list[str] = []

    def start(self) -> "Postgres":
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> "Postgres":
        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not candidates:
            raise Unavailable("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run installs it)")
        self.bin = Path(candidates[-1]).parent
        as_postgres: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None or _run("id", "postgres").returncode != 0:
                raise Unavailable("PostgreSQL will not run as root, and there is no `postgres` user to run it as")
            as_postgres = self._as_postgres = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres")
        self.root.chmod(0o755)
        data, log = self.root / "data", self.root / "postgres.log"
        result = _run(*as_postgres, str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
        if result.returncode != 0:
            raise Unavailable(f"initdb failed: {result.stderr.strip()[-300:]}")
        result = _run(*as_postgres, str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o",
                      f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}", "start")
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-500:] if log.exists() else result.stderr
            raise Unavailable(f"PostgreSQL did not start: {tail.strip()}")
        return self

    def create_database(self, name: str) -> str:
        """A new database owned by a new user of the same name; its SQLAlchemy URI (psycopg 3)."""
        for sql in (f"CREATE USER {name} PASSWORD '{name}'", f"CREATE DATABASE {name} OWNER {name}"):
            result = _run(str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-c", sql)
            if result.returncode != 0:
                raise Unavailable(f"PostgreSQL refused {sql!r}: {result.stderr.strip()}")
        return f"postgresql+psycopg://{name}:{name}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.bin is not None and (self.root / "data" / "postmaster.pid").exists():
            _run(*self._as_postgres, str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate",
                 "stop")
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on a PostgreSQL backend store, with artifacts proxied to a folder,
    bound to 127.0.0.1 (README, "Running on a cluster"). The schema is made by `mlflow db upgrade`."""

    def __init__(self, backend_uri: str, artifacts: Path) -> None:
        self.backend_uri, self.artifacts, self.port = backend_uri, artifacts, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = artifacts.parent / f"mlflow-server-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def upgrade(self) -> None:
        result = _run(sys.executable, "-m", "mlflow", "db", "upgrade", self.backend_uri)
        if result.returncode != 0:
            raise Unavailable(f"mlflow db upgrade failed: {result.stderr.strip()[-500:]}")

    def start(self) -> "MlflowServer":
        self.artifacts.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
                 "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=handle, stderr=handle, start_new_session=True)
        wait_until(lambda: urllib.request.urlopen(f"{self.url}/health", timeout=2).read() == b"OK", 120,
                   "mlflow server", self.log)
        return self

    def kill(self) -> None:
        """SIGKILL the server and its workers: a server that dies, not one that shuts down."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=30)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
            self.process = None


# --- the MLflow UI in a real browser -----------------------------------------------------------

CHROMIUM = shutil.which("chromium")
NO_CHROMIUM = "Chromium is absent (Debian: apt-get install chromium); .ci/run installs it"


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                           *args], capture_output=True, text=True, timeout=120)


def check_mlflow_ui(url: str, client, family_of_run: dict[str, str], screenshot: Path) -> None:
    """The UI at `url` lists each family's runs (run name -> family) under its experiment and no
    others, filters the vae experiment by the dataset tag, shows a run's ledger metrics, and
    renders a screenshot."""
    for family in sorted(set(family_of_run.values())):  # one experiment per family
        experiment = client.get_experiment_by_name(family).experiment_id
        runs_page = chromium("--dump-dom", f"{url}/#/experiments/{experiment}/runs").stdout
        for name, its_family in family_of_run.items():
            assert (name in runs_page) == (its_family == family), (name, family)
    experiment = client.get_experiment_by_name("vae").experiment_id
    digits_only = chromium("--dump-dom", f"{url}/#/experiments/{experiment}/runs?searchFilter="
                           + urllib.parse.quote('tags.dataset = "digits"')).stdout
    assert "digits/vae/seed0" in digits_only and "checkerboard/" not in digits_only
    run = client.search_runs([experiment], filter_string="tags.dataset = 'digits'", max_results=1)[0]
    run_page = chromium("--dump-dom", f"{url}/#/experiments/{experiment}/runs/{run.info.run_id}").stdout
    assert "test/neg_elbo" in run_page and "test/rate" in run_page
    chromium("--window-size=1400,1000", f"--screenshot={screenshot}", f"{url}/#/experiments/{experiment}/runs")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
