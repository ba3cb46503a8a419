"""A fork server for training jobs: torch, klbench and MLflow are imported once per pipeline.

Importing torch, klbench, MLflow's SQLAlchemy store and matplotlib costs about 4 s of CPU, in
every training process: on the default benchmark's 53 jobs more than training some models.
The workflow starts one server (`klbench fork-server`, from its `onstart`); each job's
`klbench train` is then a thin client that sends its command line, working directory and
environment, and its stdin/stdout/stderr as file descriptors, over a Unix socket. The server
forks a child, already holding every import, that runs the job with the client's
descriptors (so the job log is the same), and the client exits with the child's status.

What a job means is unchanged:
- the child runs exactly `klbench train ...` with the client's arguments, directory and
  environment, and opens its own MLflow store (nothing is shared but imported modules);
- SIGTERM or SIGINT to the client is passed on as SIGINT (the job ends FAILED, as after Ctrl-C); when the
  client dies (SIGKILL) the child kills itself at once, leaving its MLflow run RUNNING for the
  next attempt to close as KILLED, exactly as a killed in-process job;
- no server (a job run by hand, a cluster node), a stale socket, or a server that refuses:
  `klbench train` runs in its own process, as it always did.

The server exits when asked (the workflow's onsuccess/onerror) or after `idle` seconds with
no job running. In ps or top a running job shows the server's command line
(`klbench.cli fork-server`) beside its client's `klbench train ...`. It writes its own start-up CPU seconds next to the socket's log, so that the
pipeline's timing table can count them once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

SOCKET_ENV = "KLBENCH_FORK_SERVER"
SOCKET_DIR_PREFIX = "klbench-fork-"  # the temporary folder of a pipeline's socket, removed when the server exits
HEADER = struct.Struct("!I")  # length of the JSON request that follows


def _warm_imports() -> None:
    """What every training job imports, loaded once here so that children inherit it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
    import mlflow.entities
    import mlflow.store.tracking.sqlalchemy_store
    import mlflow.tracking  # noqa: F401 (imported for the children)

    import klbench.cli
    import klbench.run  # noqa: F401 (imported for the children)


def serve(path: Path, idle: float, info: Path | None = None) -> None:
    """Accept jobs on the Unix socket `path` until told to stop or idle for `idle` seconds."""
    _warm_imports()
    if info is not None:
        info.write_text(json.dumps({"startup_cpu_s": time.process_time(), "pid": os.getpid()}) + "\n")
    path = Path(path)
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(64)
    server.settimeout(0.5)
    children: set[int] = set()
    last_seen = time.monotonic()
    try:
        while True:
            children = {pid for pid in children if os.waitpid(pid, os.WNOHANG) == (0, 0)}
            if children:
                last_seen = time.monotonic()
            elif time.monotonic() - last_seen > idle:
                return
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            connection.settimeout(None)
            request, fds = _receive(connection)
            if request is None or request.get("stop"):
                connection.close()
                for fd in fds:
                    os.close(fd)
                if request is not None:
                    return
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                server.close()
                _run_child(connection, fds, request)  # never returns
            connection.close()
            for fd in fds:
                os.close(fd)
            children.add(pid)
            last_seen = time.monotonic()
    finally:
        server.close()
        path.unlink(missing_ok=True)
        if path.parent.name.startswith(SOCKET_DIR_PREFIX):  # the folder start_server made for it
            try:
                path.parent.rmdir()
            except OSError:
                pass


def _receive(connection: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One request: a length header and JSON, with up to three file descriptors."""
    data, fds, _, _ = socket.recv_fds(connection, 1 << 16, 3)
    if len(data) < HEADER.size:
        return None, list(fds)
    (length,) = HEADER.unpack(data[: HEADER.size])
    body = data[HEADER.size :]
    while len(body) < length:
        chunk = connection.recv(length - len(body))
        if not chunk:
            return None, list(fds)
        body += chunk
    return json.loads(body), list(fds)


def _run_child(connection: socket.socket, fds: list[int], request: dict[str, Any]) -> None:
    """In the forked child: become the client's job, run it, report the exit status."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group: signals to the server's group do not reach it
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.pop(SOCKET_ENV, None)  # the child runs the job itself
        from klbench.tracking import set_environment_defaults

        set_environment_defaults()  # the client's environment replaced the one set on import
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        threading.Thread(target=_watch_client, args=(connection,), daemon=True).start()
        from klbench.cli import main

        code = main(request["argv"])
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # a bug: its traceback goes to the job's log, as in-process
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            connection.sendall(bytes([code & 0xFF]))
        except OSError:
            pass
        os._exit(code)


def _watch_client(connection: socket.socket) -> None:
    """b"T": the client got SIGTERM/SIGINT (raise KeyboardInterrupt here); EOF: the client died."""
    while True:
        try:
            message = connection.recv(1)
        except OSError:
            message = b""
        if message == b"T":
            os.kill(os.getpid(), signal.SIGINT)
            continue
        os.kill(os.getpid(), signal.SIGKILL)  # a SIGKILLed job: stop now, as an in-process job would


def run_via_server(argv: list[str]) -> int | None:
    """Run `klbench argv` in a child of the fork server named by $KLBENCH_FORK_SERVER; its exit
    status, or None if there is no server to use (then run in this process)."""
    path = os.environ.get(SOCKET_ENV)
    if not path or not Path(path).exists():
        return None
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
    except OSError:
        client.close()
        return None
    body = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    socket.send_fds(client, [HEADER.pack(len(body)) + body], [0, 1, 2])

    def forward(signum, frame):  # the job should end as it would in-process: FAILED, cleaned up
        try:
            client.sendall(b"T")
        except OSError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = client.recv(1)
    client.close()
    if not status:  # the child died without reporting (killed, out of memory) or the server went away
        print(f"klbench: error: the job's process ended without an exit status (killed?); the fork server "
              f"is {path}, its log beside the results in logs/fork_server.log", file=sys.stderr)
        return 1
    return status[0]


def start_server(log: Path, idle: float = 120.0) -> str | None:
    """Start `klbench fork-server` in the background (its own session, logging to `log`), wait
    until it listens, and name it in $KLBENCH_FORK_SERVER for the jobs started from here; the
    socket's path, or None (jobs then run in their own processes) if it does not come up."""
    import subprocess
    import tempfile

    # a short path: Unix socket paths are limited to about 100 bytes
    path = Path(tempfile.mkdtemp(prefix=SOCKET_DIR_PREFIX)) / "fork.sock"
    log.parent.mkdir(parents=True, exist_ok=True)
    info = log.with_suffix(".json")
    with log.open("w") as handle:
        subprocess.Popen([sys.executable, "-m", "klbench.cli", "fork-server", "--socket", str(path),
                          "--idle", str(idle), "--info", str(info)],
                         stdin=subprocess.DEVNULL, stdout=handle, stderr=handle, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.exists():
            os.environ[SOCKET_ENV] = str(path)
            return str(path)
        time.sleep(0.1)
    print(f"klbench: the fork server did not start (see {log}); jobs run in their own processes", file=sys.stderr)
    return None


def stop_server(path: str | Path | None) -> None:
    """Ask the server at `path` to exit (it also exits by itself when idle)."""
    if path is None:
        return
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(path))
        body = json.dumps({"stop": True}).encode()
        client.sendall(HEADER.pack(len(body)) + body)
    except OSError:
        pass
    finally:
        client.close()
