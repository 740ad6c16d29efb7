"""Running untrusted Python (model completions) in a contained child process.

Why it is built this way
- The code a policy writes is hostile by accident or on purpose: fork bombs,
  infinite loops, memory hogs, sockets, writes outside its directory, reads of
  the reward service's secrets. Each run gets a fresh child process, so the
  reward service itself never executes the code and survives whatever it does.
- Layers, strongest first, chosen once per process by probing what works here
  (``SandboxSettings.isolation = "auto"``):

  ``namespaces``
      ``unshare`` puts the child in new network, PID, mount, IPC and UTS
      namespaces (``--map-root-user`` adds a user namespace when the service
      is not root). No network device but a downed loopback: a connect to
      127.0.0.1 fails with "network unreachable". The run has a PID namespace
      with its own /proc, so it sees none of the service's processes, and
      killing its first process (``--kill-child``) kills everything it forked.
      The throwaway work directory is bind-mounted over /tmp; /var/tmp,
      /dev/shm and the secret mount points (``hide_paths``) get empty tmpfs.
  ``seccomp``
      Where namespaces are not allowed (a container without CAP_SYS_ADMIN):
      a seccomp filter makes ``socket()`` fail with EACCES for every address
      family but AF_UNIX (and refuses io_uring, which could open sockets too).
  both
      resource limits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS),
      processes (RLIMIT_NPROC), file size (RLIMIT_FSIZE, which also caps the
      captured stdout/stderr), open files and no core dumps; a wall-clock
      deadline after which the process group is killed; a clean environment
      (PATH and LANG only, so no inherited secret); a throwaway directory as
      cwd and HOME; ``python -I -S`` (no PYTHON* variables, no site-packages).
      The code runs as the child of a small supervisor (the bootstrap): in a
      PID namespace the code is then not PID 1, which would ignore the CPU
      limit's SIGXCPU; the supervisor reports the code's exit status and, as a
      child subreaper, keeps what the code orphans (even after ``setsid()``) in
      the run's process tree, which is killed after the run.
      When the service runs as root, the code runs as an unprivileged uid of
      its own (``uid_base + slot``; one slot per concurrent run), so it can
      neither read root's files nor share its process count with another run,
      and every process of that uid is killed after the run. When it does not
      run as root the service marks itself non-dumpable, so the child (same
      uid) cannot read ``/proc/<service pid>/environ``.

- What is not contained: CPU time of a well-behaved-looking loop up to its
  limits, and, in the ``seccomp`` fallback as the service's own uid, files
  that uid may read and processes of that uid it may signal (the service's, or
  its own supervisor's: killed, it no longer holds the run's orphans). Run the
  reward service as a dedicated user there, or better as root.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import platform
import queue
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger(__name__)

Isolation = Literal["namespaces", "seccomp", "rlimits"]


class SandboxSettings(BaseSettings):
    """Process-wide sandbox settings (env ``RLFLEET_SANDBOX_*``); per-run limits come
    from the verifier's config. A job cannot weaken these."""

    model_config = SettingsConfigDict(env_prefix="RLFLEET_SANDBOX_", use_attribute_docstrings=True)

    isolation: Literal["auto", "namespaces", "seccomp", "rlimits"] = "auto"
    """auto: the strongest layer that works here (namespaces, else seccomp, else rlimits)."""
    python: str = ""
    """Interpreter that runs the code; empty: this one if the sandbox uid can run it, else a
    system python3."""
    uid_base: int = Field(default=60000, ge=1000)
    """When the service is root: the code runs as uid_base + slot (slots are concurrent runs)."""
    slots: int = Field(default=16, ge=1, le=1024)
    """Concurrent sandboxed runs; more wait for a free slot."""
    work_dir: str = ""
    """Where throwaway work directories are made (empty: the system temp dir)."""
    hide_paths: list[str] = ["/run/secrets", "/var/run/secrets", "/etc/rlfleet"]
    """Directories hidden behind an empty tmpfs in the namespaces layer (mounted secrets)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run."""

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_mb: int = 256
    max_processes: int = 16
    max_file_mb: int = 16
    max_open_files: int = 64


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None
    """Exit code; negative: killed by that signal; None when the wall deadline hit."""
    stdout: str
    stderr: str
    timed_out: bool
    wall_seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# The child's first program: limits, mounts and privileges, then exec of the code.
# It runs with `python -I -S`, before any untrusted byte is read.
_BOOTSTRAP = r"""
import ctypes, json, os, resource, struct, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)

def check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, what + ": " + os.strerror(err))

def mount(src, dst, fstype, flags, data):
    check(libc.mount(src.encode(), dst.encode(), fstype.encode() if fstype else None,
                     ctypes.c_ulong(flags), data.encode() if data else None), "mount " + dst)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND = 1, 2, 4, 4096
if cfg["mounts"]:
    mount(cfg["work"], "/tmp", None, MS_BIND, None)
    for d in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(d):
            mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=1777")
    for d in cfg["hide"]:
        if os.path.isdir(d):
            mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, "size=4k,mode=0755")
    os.chdir("/tmp")

# The code does not run as this process, which stays as its supervisor, for two reasons:
# - In a new PID namespace this process is PID 1, and the kernel drops every signal
#   PID 1 has no handler for: the CPU limit's SIGXCPU would not stop the code.
# - As a child subreaper it inherits what the code orphans (a child that called
#   setsid() and whose parent exited), so the service still finds all of a run's
#   processes under the run's process and can kill them (Sandbox._kill).
# It reports the code's wait status on status_fd (PID 1 could not pass a signal on by
# dying of it) and reaps orphans until none is left or the service kills it. It
# forks before the limits and uid change, so it neither uses the code's share of
# them nor, under a uid of its own, can be signalled by the code. It has no seccomp
# filter: non-dumpable, the code cannot ptrace it (or read its fds) where they share a uid.
status_fd = cfg["status_fd"]
check(libc.prctl(36, 1, 0, 0, 0), "PR_SET_CHILD_SUBREAPER")
check(libc.prctl(4, 0, 0, 0, 0), "PR_SET_DUMPABLE")  # (the code's exec makes it dumpable again)
code_pid = os.fork()
if code_pid:
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        if pid == code_pid:
            os.write(status_fd, b"%d" % status)
            os.close(status_fd)
os.close(status_fd)

lim = cfg["limits"]
resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu"], lim["cpu"] + 1))
for name, value in (("RLIMIT_AS", lim["memory"]), ("RLIMIT_FSIZE", lim["fsize"]),
                    ("RLIMIT_NOFILE", lim["nofile"]), ("RLIMIT_CORE", 0),
                    ("RLIMIT_NPROC", lim["nproc"])):
    resource.setrlimit(getattr(resource, name), (value, value))

if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])

check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
if cfg["seccomp"]:
    prog = bytes.fromhex(cfg["seccomp"])
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("HxxxxxxP", len(prog) // 8, ctypes.addressof(buf))
    check(libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0), "PR_SET_SECCOMP")

os.execv(cfg["python"], [cfg["python"], "-I", "-S", "-B", "main.py", *cfg["argv"]])
"""

# seccomp-bpf: socket() only for AF_UNIX, no io_uring, no x32 syscalls.
_ARCH = {
    # machine: (AUDIT_ARCH_*, __NR_socket, __NR_io_uring_setup)
    "x86_64": (0xC000003E, 41, 425),
    "aarch64": (0xC00000B7, 198, 425),
}


def _seccomp_program() -> str:
    """The filter as hex (struct sock_filter[] in native order), or "" on an unknown arch."""
    arch = _ARCH.get(platform.machine())
    if arch is None:
        return ""
    audit_arch, nr_socket, nr_io_uring = arch
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | 13  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EACCES
    # (code, jt, jf, k); jumps count the instructions skipped.
    prog = [
        (ld, 0, 0, 4),  # 0: A = arch
        (jeq, 0, 6, audit_arch),  # 1: other arch -> allow (8)
        (ld, 0, 0, 0),  # 2: A = syscall nr
        (jge, 5, 0, 0x40000000),  # 3: x32 -> deny (9)
        (jeq, 0, 2, nr_socket),  # 4: socket -> 5, else -> 7
        (ld, 0, 0, 16),  # 5: A = args[0] (family), low word
        (jeq, 1, 2, 1),  # 6: AF_UNIX -> allow (8), else deny (9)
        (jeq, 1, 0, nr_io_uring),  # 7: io_uring_setup -> deny (9), else allow (8)
        (ret, 0, 0, allow),  # 8
        (ret, 0, 0, deny),  # 9
    ]
    import struct

    return b"".join(struct.pack("=HBBI", *ins) for ins in prog).hex()


_NS_FLAGS = ["--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", "--uts"]


@functools.cache
def _namespaces_work() -> list[str] | None:
    """The ``unshare`` prefix if it works here (probed once), else None."""
    binary = shutil.which("unshare")
    if binary is None:
        return None
    prefix = [binary, *_NS_FLAGS]
    if os.geteuid() != 0:
        prefix.insert(1, "--map-root-user")
    try:
        done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, env={})
    except (OSError, subprocess.SubprocessError):
        return None
    return prefix if done.returncode == 0 else None


def _world_runnable(path: str) -> bool:
    """True if a user with no special rights can run ``path`` (every parent dir o+x)."""
    real = Path(os.path.realpath(path))
    try:
        mode = real.stat().st_mode
        if not (mode & stat.S_IXOTH and mode & stat.S_IROTH):
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    except OSError:
        return False


def _pick_python(configured: str, *, drop_uid: bool) -> str:
    if configured:
        return configured
    if not drop_uid or _world_runnable(sys.executable):
        return sys.executable
    for candidate in ("/usr/local/bin/python3", "/usr/bin/python3"):
        if _world_runnable(candidate):
            return candidate
    raise RuntimeError(
        f"no python3 that an unprivileged uid can run (tried {sys.executable}, "
        "/usr/local/bin/python3, /usr/bin/python3); set RLFLEET_SANDBOX_PYTHON"
    )


class Sandbox:
    """Runs Python source in a contained child process (see the module docstring)."""

    def __init__(self, settings: SandboxSettings | None = None):
        self.settings = settings or SandboxSettings()
        self.is_root = os.geteuid() == 0
        self.isolation, self._prefix = self._choose(self.settings.isolation)
        self._seccomp = _seccomp_program() if self.isolation != "rlimits" else ""
        if self.isolation == "seccomp" and not self._seccomp:
            raise RuntimeError(f"seccomp isolation is not supported on {platform.machine()}")
        self.python = _pick_python(self.settings.python, drop_uid=self.is_root)
        if self.is_root:
            # Processes a run orphans (after setsid, or when its PID namespace dies)
            # are re-parented to us, not to an init that may never reap them (or that
            # reaps late: their uid's process count would stay used); _reap() collects
            # them by the run's uid.
            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        if not self.is_root:
            # The child runs as our uid: without this it could read our
            # /proc/<pid>/environ (secrets). Non-dumpable makes that root-only.
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.settings.slots):
            self._slots.put(slot)
        logger.info(
            "code sandbox ready",
            extra={"isolation": self.isolation, "python": self.python, "drop_uid": self.is_root},
        )

    @staticmethod
    def _choose(wanted: str) -> tuple[Isolation, list[str]]:
        if wanted in ("auto", "namespaces"):
            prefix = _namespaces_work()
            if prefix is not None:
                return "namespaces", prefix
            if wanted == "namespaces":
                raise RuntimeError("namespaces isolation was asked for but `unshare` fails here")
        if wanted in ("auto", "seccomp") and _seccomp_program():
            return "seccomp", []
        if wanted == "seccomp":
            raise RuntimeError(f"seccomp isolation is not supported on {platform.machine()}")
        return "rlimits", []

    def run(
        self,
        code: str,
        *,
        stdin: str = "",
        limits: SandboxLimits | None = None,
        argv: list[str] | None = None,
    ) -> SandboxResult:
        """Runs ``code`` as ``main.py`` with ``stdin``; never raises for anything the code does."""
        limits = limits or SandboxLimits()
        slot = self._slots.get()
        try:
            return self._run(code, stdin, limits, argv or [], slot)
        finally:
            self._slots.put(slot)

    def _run(
        self, code: str, stdin: str, limits: SandboxLimits, argv: list[str], slot: int
    ) -> SandboxResult:
        uid = self.settings.uid_base + slot if self.is_root else None
        outer = Path(tempfile.mkdtemp(prefix="rlfleet-sbx-", dir=self.settings.work_dir or None))
        try:
            # The code's uid may pass through (not list) the outer dir to its own work dir;
            # the captured output next to it stays root's.
            outer.chmod(0o711)
            work = outer / "work"
            work.mkdir()
            (work / "main.py").write_text(code)
            if uid is not None:
                os.chown(work, uid, uid)
                os.chown(work / "main.py", uid, uid)
            _private_file(outer / "stdin").write(stdin.encode())
            nproc = limits.max_processes
            if uid is None:  # RLIMIT_NPROC counts every process and thread of our uid
                nproc += len(os.listdir("/proc/self/task")) + 1  # + the run's supervisor
            cfg = {
                "mounts": self.isolation == "namespaces",
                "work": str(work),
                "hide": self.settings.hide_paths,
                "uid": uid,
                "seccomp": self._seccomp,
                "python": self.python,
                "argv": argv,
                "limits": {
                    "cpu": limits.cpu_seconds,
                    "memory": limits.memory_mb * 1024 * 1024,
                    "fsize": limits.max_file_mb * 1024 * 1024,
                    "nofile": limits.max_open_files,
                    "nproc": nproc,
                },
            }
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}
            if self.isolation != "namespaces":
                env["HOME"] = str(work)
            start = time.monotonic()
            with (
                open(outer / "stdin", "rb") as fin,
                _private_file(outer / "stdout") as fout,
                _private_file(outer / "stderr") as ferr,
            ):
                # The supervisor reports the code's wait status on this pipe (_BOOTSTRAP).
                status_r, cfg["status_fd"] = os.pipe()
                command = [*self._prefix, self.python, "-I", "-S", "-c", _BOOTSTRAP]
                with open(status_r, "rb", buffering=0) as status:
                    try:
                        popen = subprocess.Popen(
                            [*command, json.dumps(cfg)],
                            cwd=work,
                            env=env,
                            stdin=fin,
                            stdout=fout,
                            stderr=ferr,
                            start_new_session=True,
                            close_fds=True,
                            pass_fds=(cfg["status_fd"],),
                        )
                    finally:
                        os.close(cfg["status_fd"])  # so `status` ends with the supervisor
                    returncode, timed_out = _wait_status(popen, status, start + limits.wall_seconds)
                    self._kill(popen, uid)
            elapsed = time.monotonic() - start
            return SandboxResult(
                returncode=returncode,
                stdout=_read_capped(outer / "stdout"),
                stderr=_read_capped(outer / "stderr"),
                timed_out=timed_out,
                wall_seconds=elapsed,
            )
        finally:
            shutil.rmtree(outer, ignore_errors=True)

    def _kill(self, popen: subprocess.Popen, uid: int | None) -> None:
        """Kills the run's processes: without a uid of its own and a PID namespace, every
        descendant of its supervisor; then its process group; then (root, no PID
        namespace) every process of its uid."""
        if uid is None and self.isolation != "namespaces" and popen.returncode is None:
            # A child that called setsid() left the process group, and the uid is ours,
            # so neither finds it; but it is still in the supervisor's tree.
            _kill_descendants(popen.pid)
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        popen.wait()
        if uid is None:
            return
        if self.isolation != "namespaces":  # (a PID namespace dies with its first process)
            # A child that called setsid() left the group; as its uid, kill(-1)
            # reaches every process of that uid (and never the caller itself).
            subprocess.run(
                [self.python, "-I", "-S", "-c", "import os; os.kill(-1, 9)"],
                user=uid,
                group=uid,
                extra_groups=[],
                env={},
                capture_output=True,
                timeout=10,
                check=False,
            )
        _reap(uid)


def _wait_status(popen: subprocess.Popen, status, deadline: float) -> tuple[int | None, bool]:
    """(returncode, timed_out) of the code: its wait status as its supervisor reports it
    (the supervisor outlives it, so ``popen`` cannot tell), or the run's own exit status
    when the supervisor ended without a report (the bootstrap failed)."""
    poll = select.poll()  # (select() fails on descriptors above 1023)
    poll.register(status, select.POLLIN)
    if poll.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        try:  # (where the code shares our uid, it could write here too: no trust)
            return os.waitstatus_to_exitcode(int(status.read(32))), False
        except ValueError:  # no report (EOF) or not one the supervisor writes
            pass
    try:
        return popen.wait(max(0.0, deadline - time.monotonic())), False
    except subprocess.TimeoutExpired:
        return None, True


def _kill_descendants(root: int, *, within_s: float = 2.0) -> None:
    """SIGKILLs every descendant of ``root`` (not ``root``) until none is left.

    ``root`` is the run's supervisor, a child subreaper: what its tree orphans becomes
    its child, so the tree stays whole while it lives. Processes forked between a scan
    and its kills are found by the next scan (their parents died: they are the
    supervisor's now); the supervisor reaps the dead.
    """
    end = time.monotonic() + within_s
    while True:
        children: dict[int, list[int]] = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat_line = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            state, ppid = stat_line.rsplit(")", 1)[1].split()[:2]
            if state != "Z":  # a zombie is dead already, only not yet reaped
                children.setdefault(int(ppid), []).append(int(pid))
        found, todo = [], list(children.get(root, []))
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        if not found or time.monotonic() > end:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _reap(uid: int, *, within_s: float = 2.0) -> None:
    """Waits until no process of ``uid`` is left, reaping those re-parented to us.

    Each by its pid (never ``waitpid(-1)``, which could steal another thread's child).
    """
    me = str(os.getpid())
    end = time.monotonic() + within_s
    while True:
        left = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if fields.get("Uid", "").split()[:1] != [str(uid)]:
                continue
            left += 1
            if fields.get("PPid", "").strip() == me:
                try:
                    os.waitpid(int(pid), os.WNOHANG)
                except ChildProcessError:
                    pass
        if not left or time.monotonic() > end:
            return
        time.sleep(0.02)


MAX_CAPTURE_BYTES = 1024 * 1024
"""Most of stdout / stderr kept per run (the file limit already stops a runaway writer)."""


def _private_file(path: Path):
    """A new file only its owner (the service) can read, opened for writing."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def _read_capped(path: Path) -> str:
    with open(path, "rb") as fh:
        return fh.read(MAX_CAPTURE_BYTES).decode("utf-8", errors="replace")


_default: Sandbox | None = None
_default_lock = threading.Lock()


def default_sandbox() -> Sandbox:
    """The process-wide sandbox (settings from ``RLFLEET_SANDBOX_*``), built on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Sandbox()
        return _default
