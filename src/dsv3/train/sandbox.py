"""Code rewards for GRPO: a completion's code run against test cases in a sandboxed child process.

DeepSeek-R1's rule-based rewards (§2.2.2) score code by running it against test cases. The project's rule: code
a model wrote runs only in a separate process with time and memory limits, no network and a throwaway directory.
`run_tests` is that process, `code_reward` maps a batch of completions to scores, `extract_code` finds the code.

The child is `python -I -S -B` running this very file (stdlib only: no site-packages, no PYTHON* variables, no
.pyc written), in its own session, with PATH, LANG, HOME and TMPDIR as its whole environment, in a fresh
`tempfile.mkdtemp()` directory that is removed afterwards whatever happened. It reads its request (code, tests,
limits, a per-run nonce) from stdin, closes stdin, puts up the layers below, then `exec`s the code and each test
in one namespace and reports on a pipe of its own. Linux only. The layers, outermost first, and what each does
NOT cover (each one that engages is listed in `SandboxResult.layers`):

- parent (always): a wall-clock deadline and a cap on stdout + stderr, read incrementally (never buffered);
  on a breach, and at the end in every case, the child's whole process group is SIGKILLed. A process that left
  the group would escape this, but every layer below refuses to fork.
- "rlimits" (always): RLIMIT_AS = memory_mb (allocations past it raise MemoryError), RLIMIT_CPU ~ timeout_s,
  RLIMIT_FSIZE = max_output_bytes per file (writes past it fail with EFBIG), RLIMIT_NOFILE 64, RLIMIT_NPROC 0,
  RLIMIT_CORE 0. They bound one file, not the number of files (the audit hook counts those), and RLIMIT_NPROC
  does not bind root in the initial user namespace.
- "netns": unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC), or without CLONE_NEWUSER as root: an empty
  network stack (not even loopback) and private System V IPC. Absent where user namespaces are disabled.
- "landlock" (Linux >= 5.13 with Landlock on; the ABI decides how much): files are readable only under the
  stdlib, /usr and /lib*, writable only in the directory and /dev/null; TCP bind/connect refused (ABI >= 4);
  signals and abstract unix sockets beyond the sandbox refused (ABI >= 6). It does not cover UDP or stat().
- "seccomp" (x86-64 only): socket (socketpair stays), fork/clone/exec, kill and friends, ptrace, process_vm_*,
  mknod, mount, unshare/setns, io_uring, bpf, System V IPC, alarm/timers and rt_sigaction fail with EPERM; any
  other syscall ABI (i386, x32) kills the process. SIGINT is set to ignored first, so no Python-level signal
  handler is left, and none can be installed, to be handed a frame.
- "audit" (always; `sys.addaudithook`, which Python code cannot remove): writing outside the directory,
  sockets (all but AF_UNIX ones, which may never connect, bind or send to an address: socketpair), processes,
  signals, ctypes, setrlimit, links, and more than 64 files opened for writing end the run at once
  ("forbidden", or "output_limit" for the file count); reading outside the stdlib and the directory raises
  PermissionError, and frame and heap introspection (sys._getframe, tb_frame, gc.get_objects, settrace) raise,
  to keep the nonce below out of reach. PEP 578 says it plainly: an audit hook is not a sandbox. Hand-made
  bytecode (marshal.loads and code.replace stay open: imports and asyncio need them) or a CPython memory bug
  gets round it, and a path-like object whose __fspath__ answers differently the second time fools its path
  checks; the kernel layers still hold then, where they engaged.

Results cannot be forged by printing: the child reports `<nonce> <status> <per-test bits>` on a pipe of its
own, the nonce (fresh per run) comes in on stdin, which is closed before the code runs, and lives only in a local
variable of `_child_main`, written with builtins bound before the code could patch them; the parent rejects any
other line on that pipe as tampering. What remains: code that reads the bootstrap's frames (through a signal
handler where seccomp is missing, or through hand-made bytecode) can learn the nonce and forge a pass; and code
can "pass" a test semantically (an object whose __eq__ is always True, patched builtins) — reward hacking that
only better tests catch.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# Statuses that score 0 whatever the tests said: a limit, a crash or a refused operation ended the run.
SCORED_STATUSES = ("ok", "failed")
STATUSES = SCORED_STATUSES + ("timeout", "memory", "output_limit", "crash", "forbidden", "syntax_error")


@dataclass
class SandboxResult:
    """The outcome of one `run_tests` call."""

    passed: int  # test cases that passed (0 unless the run reached its end: status "ok" or "failed")
    total: int  # test cases run, or that would have been run
    status: str  # one of STATUSES
    detail: str = ""  # a short, human-readable reason (the first failure, the limit hit, the refused operation)
    layers: tuple[str, ...] = ()  # the isolation layers that engaged in the child (see the module docstring)

    @property
    def score(self) -> float:
        """passed / total; 0.0 whenever a limit, a crash, a refusal or a syntax error ended the run."""
        if self.status not in SCORED_STATUSES or self.total == 0:
            return 0.0
        return self.passed / self.total


# ---------------------------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^ {0,3}```[ \t]*([\w+.-]*)[^\n]*\n(.*?)^ {0,3}```", re.DOTALL | re.MULTILINE)
_PYTHON_TAGS = ("python", "py", "python3", "")

# Exit codes of the child when it cannot report on its pipe (the parent turns them into statuses).
_EXIT_FORBIDDEN, _EXIT_OUTPUT, _EXIT_MEMORY, _EXIT_TAMPERED = 86, 87, 88, 89
_STDERR_TAIL = 4096  # bytes of the child's stderr kept for `detail`
# Layers the child leaves down ("netns", "landlock", "seccomp", "audit"): for tests that show each layer holding
# on its own, as on a machine without the others. Never set outside tests.
_SKIP_LAYERS: frozenset[str] = frozenset()


def extract_code(completion: str) -> str | None:
    """The last fenced block tagged python, py or python3, or untagged, in a model's completion; None if none."""
    blocks = [body for tag, body in _FENCE.findall(completion) if tag.lower() in _PYTHON_TAGS]
    return blocks[-1] if blocks else None


def run_tests(code: str, tests: list[str], *, timeout_s: float = 5.0, memory_mb: int = 512,
              max_output_bytes: int = 1 << 16) -> SandboxResult:
    """Run `code`, then each test (a snippet such as `assert add(2, 3) == 5`) after it in the same fresh,
    sandboxed interpreter; a test passes when it does not raise.

    `timeout_s` bounds the whole run (start-up, code and every test) by the wall clock and, rounded up, by CPU
    time; `memory_mb` is the child's address space; `max_output_bytes` caps stdout + stderr together and each
    file the code writes. The tests are trusted: one that does not compile raises ValueError here."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"dsv3.train.sandbox runs code only on Linux (rlimits, namespaces, /proc); "
                           f"this is {sys.platform}")
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    tests = list(tests)
    if not tests:
        raise ValueError("tests is empty: a reward needs at least one test case")
    for i, test in enumerate(tests):
        if not isinstance(test, str):
            raise TypeError(f"test {i} must be a str, got {type(test).__name__}")
        try:
            compile(test, f"<test {i}>", "exec")
        except (SyntaxError, ValueError) as e:
            raise ValueError(f"test {i} does not compile ({e}): {test[:200]!r}") from None
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be >= 64 (the interpreter alone needs ~30 MB), got {memory_mb}")
    if max_output_bytes < 1:
        raise ValueError(f"max_output_bytes must be >= 1, got {max_output_bytes}")

    nonce = secrets.token_hex(16)
    request = {"nonce": nonce, "code": code, "tests": tests, "memory_mb": memory_mb,
               "cpu_s": int(-(-timeout_s // 1)) + 1, "max_output_bytes": max_output_bytes,
               "skip": sorted(_SKIP_LAYERS)}
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="dsv3-sandbox-"))
    report_r, report_w = os.pipe()
    try:
        request["report_fd"] = report_w
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir},
            start_new_session=True, pass_fds=(report_w,))
        os.close(report_w)
        report_w = -1
        try:
            deadline = time.monotonic() + timeout_s
            stop, report, stderr_tail = _drain(proc, json.dumps(request).encode(), report_r, deadline,
                                               max_output_bytes, max_report_bytes=8192 + 2 * len(tests))
            if stop == "eof" and not _exited_by(proc.pid, deadline):
                stop = "timeout"
        finally:  # in every case, also when reading failed: nothing of the child's may outlive this call
            _kill_group(proc)
            returncode = proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                pipe.close()
    finally:
        for fd in (report_r, report_w):
            if fd >= 0:
                os.close(fd)
        _remove_tree(workdir)
    return _verdict(nonce.encode(), len(tests), stop, returncode, report, stderr_tail, timeout_s,
                    max_output_bytes)


def code_reward(completions: list[str], tests: list[list[str]], **limits) -> list[float]:
    """One score per completion: `run_tests(extract_code(completion), tests[i], **limits).score`, or 0.0 when
    the completion has no code block. Runs at most one sandbox per CPU at a time (threads that each wait on a
    child process); the scores come back in the completions' order."""
    if len(completions) != len(tests):
        raise ValueError(f"{len(completions)} completions but {len(tests)} test lists: one list per completion")
    codes = [extract_code(c) for c in completions]

    def score(i: int) -> float:
        return 0.0 if codes[i] is None else run_tests(codes[i], tests[i], **limits).score

    if not codes:
        return []
    workers = min(len(codes), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(score, range(len(codes))))


def _drain(proc: subprocess.Popen, payload: bytes, report_r: int, deadline: float, max_output_bytes: int,
           max_report_bytes: int) -> tuple[str, bytes, bytes]:
    """Write `payload` to the child's stdin and read its stdout, stderr and report pipe as they come, keeping
    only the report and the tail of stderr, until every pipe is at EOF ("eof"), the deadline ("timeout"),
    stdout + stderr pass `max_output_bytes` ("output") or the report passes `max_report_bytes` ("report").
    Returns (why it stopped, the report, the stderr tail)."""
    stdin, stdout, stderr = proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno()
    os.set_blocking(stdin, False)
    sel = selectors.DefaultSelector()
    sel.register(stdin, selectors.EVENT_WRITE)
    for fd in (stdout, stderr, report_r):
        sel.register(fd, selectors.EVENT_READ)
    pending = memoryview(payload)
    output = 0
    report, stderr_tail = bytearray(), b""
    try:
        while sel.get_map():
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return "timeout", bytes(report), stderr_tail
            for key, _ in sel.select(timeout):
                fd = key.fd
                if fd == stdin:
                    try:
                        pending = pending[os.write(stdin, pending):]
                    except BrokenPipeError:  # the child is gone already; its exit status will say why
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    sel.unregister(fd)
                elif fd == report_r:
                    report += chunk
                    if len(report) > max_report_bytes:
                        return "report", bytes(report), stderr_tail
                else:
                    output += len(chunk)
                    if fd == stderr:
                        stderr_tail = (stderr_tail + chunk)[-_STDERR_TAIL:]
                    if output > max_output_bytes:
                        return "output", bytes(report), stderr_tail
        return "eof", bytes(report), stderr_tail
    finally:
        sel.close()


def _exited_by(pid: int, deadline: float) -> bool:
    """Whether the child exits before the deadline (it may close its pipes and go on). Waits without reaping,
    so that its process group id cannot be reused before `_kill_group`."""
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole session/process group; the child is not reaped yet, so the id is still its."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _remove_tree(path: str) -> None:
    """Remove the throwaway directory, first giving back any directory the code made unreadable (never
    following a link: the code must not get us to chmod something outside)."""
    try:
        os.chmod(path, stat.S_IRWXU)
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                p = os.path.join(root, d)
                if stat.S_ISDIR(os.lstat(p).st_mode):
                    os.chmod(p, stat.S_IRWXU)
        shutil.rmtree(path)
    except FileNotFoundError:  # the code removed its own directory
        pass
    except OSError as e:
        warnings.warn(f"sandbox: could not remove the throwaway directory {path}: {e}")


def _verdict(nonce: bytes, total: int, stop: str, returncode: int, report: bytes, stderr_tail: bytes,
             timeout_s: float, max_output_bytes: int) -> SandboxResult:
    """Turn what the child left (why reading stopped, its exit status, its report, its stderr) into a result."""
    layers, final, tampered = _parse_report(report, nonce, total)

    def result(status: str, detail: str, passed: int = 0) -> SandboxResult:
        return SandboxResult(passed, total, status, detail, layers)

    if stop == "output":
        return result("output_limit", f"stdout + stderr passed {max_output_bytes} bytes")
    if stop == "timeout":
        return result("timeout", f"still running after {timeout_s:g} s")
    if stop == "report" or tampered:
        return result("forbidden", "something other than the sandbox wrote on its report pipe")
    if final is not None:
        status, bits, detail = final
        if status == "done":
            passed = bits.count("1")
            return result("ok" if passed == total else "failed", detail, passed)
        return result(status, detail)
    # No final report: the child died or was stopped before its end.
    err_lines = stderr_tail.decode("utf-8", "replace").strip().splitlines()
    last_lines = " | ".join(err_lines[-3:])
    refusal = next((line for line in reversed(err_lines) if line.startswith("sandbox: ")), last_lines)
    if returncode == _EXIT_FORBIDDEN:
        return result("forbidden", refusal)
    if returncode == _EXIT_OUTPUT:
        return result("output_limit", refusal)
    if returncode == _EXIT_MEMORY:
        return result("memory", "out of memory while reporting")
    if returncode == _EXIT_TAMPERED:
        return result("forbidden", "the code replaced or closed the report pipe")
    if returncode == -signal.SIGXCPU:
        return result("timeout", f"CPU time limit ({timeout_s:g} s, rounded up) exceeded")
    if returncode == -signal.SIGXFSZ:
        return result("output_limit", f"a file passed {max_output_bytes} bytes")
    if returncode < 0:
        try:
            how = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
    else:
        how = f"exit code {returncode}"
    return result("crash", f"{how}: {last_lines}" if last_lines else how)


def _parse_report(report: bytes, nonce: bytes, total: int) -> tuple[tuple[str, ...], tuple | None, bool]:
    """(layers, (status, bits, detail) or None, tampered) from the report pipe's lines: `<nonce> ready
    <layers>` once the sandbox is up, then `<nonce> <status> <bits> <detail hex>` at the end. Anything else,
    or a line without the nonce, is tampering."""
    lines = [line.split(b" ") for line in report.split(b"\n")]
    layers = ()
    if len(lines) > 1 and lines[0][0] == nonce and len(lines[0]) == 3 and lines[0][1] == b"ready":
        layers = tuple(lines[0][2].decode("ascii", "replace").split(","))
    if lines[-1] != [b""] or any(line[0] != nonce for line in lines[:-1]):  # a line cut short, or not ours
        return layers, None, True
    if len(lines) == 1:  # nothing: the child died before its layers were up
        return layers, None, False
    if not layers or len(lines) > 3:
        return layers, None, True
    if len(lines) == 2:  # up, but no end
        return layers, None, False
    fields = [f.decode("ascii", "replace") for f in lines[1][1:]]
    if len(fields) != 3 or fields[0] not in ("done", "syntax_error", "memory", "crash"):
        return layers, None, True
    status, bits, detail = fields
    if status == "done" and (len(bits) != total or bits.strip("01")):
        return layers, None, True
    try:
        detail = "" if detail == "-" else bytes.fromhex(detail).decode("utf-8", "replace")
    except ValueError:
        return layers, None, True
    return layers, (status, bits, detail), False


# ---------------------------------------------------------------------------------------------------------------
# Child side: runs as `python -I -S -B sandbox.py`, stdlib only. Everything below that runs after the untrusted
# code has started uses only names bound before it (default arguments, closures, locals) and methods of
# immutable builtin types: the code can patch any module or builtin, and must not get a look at the nonce.
# ---------------------------------------------------------------------------------------------------------------

_MAX_WRITE_OPENS = 64  # files opened for writing or directories made, per run: RLIMIT_FSIZE bounds each one
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_WRITABLE_FILES = ("/dev/null",)
_READABLE_FILES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/etc/localtime", "/etc/ld.so.cache")
_SYSTEM_LIBRARIES = ("/usr", "/lib", "/lib64", "/lib32")  # what stdlib extension modules link against

# Audit events that end the run as "forbidden" (exact names, then prefixes).
_VIOLATIONS = frozenset({
    "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "os.startfile",
    "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit",
    "resource.prlimit", "os.symlink", "os.link", "webbrowser.open", "sys.remote_exec",
})
_VIOLATION_PREFIXES = ("socket.", "ctypes.", "_winapi.", "winreg.", "msvcrt.")
# Events that change the filesystem: (index of a path argument, index of its dir_fd argument or None), ...
_PATH_WRITES = {
    "os.mkdir": ((0, 2),), "os.rmdir": ((0, 1),), "os.remove": ((0, 1),), "os.rename": ((0, 2), (1, 3)),
    "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, None),),
    "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
}
# Introspection that reaches frames or every object (and so the bootstrap's nonce): refused, not fatal.
_INTROSPECTION = frozenset({
    "sys._current_frames", "sys._current_exceptions", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "sys.settrace", "sys.setprofile", "sys.addaudithook",
})
_FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"})
# Modules that read raw memory or run code outside this interpreter's audit hook.
_REFUSED_IMPORTS = frozenset({
    "ctypes", "_ctypes", "_testcapi", "_testinternalcapi", "_testmultiphase", "_testsinglephase",
    "_xxsubinterpreters", "_xxinterpchannels", "_interpreters", "_interpchannels", "_interpqueues",
})

# seccomp: x86-64 syscalls that fail with EPERM inside the sandbox.
_SECCOMP_DENY_X86_64 = (
    41, 42, 43, 49, 50, 288,  # socket connect accept bind listen accept4 (socketpair stays: asyncio needs it)
    56, 57, 58, 59, 322, 435,  # clone fork vfork execve execveat clone3
    62, 200, 234, 129, 297, 424, 434, 438,  # kill tkill tgkill rt_(tg)sigqueueinfo pidfd_send_signal/open/getfd
    13, 37, 38, 222,  # rt_sigaction alarm setitimer timer_create
    101, 310, 311,  # ptrace process_vm_readv process_vm_writev
    133, 259,  # mknod mknodat
    29, 64, 68, 240,  # shmget semget msgget mq_open (System V / POSIX IPC outlives the process)
    155, 161, 165, 166, 272, 308, 428, 429, 430, 431, 432, 433, 442,  # pivot_root chroot mount ... mount_setattr
    425, 426, 427, 321, 298, 323, 248, 249, 250, 303, 304,  # io_uring bpf perf userfaultfd keys handles
)
_AUDIT_ARCH_X86_64 = 0xC000003E

# Landlock (linux/landlock.h).
_LL_CREATE_RULESET, _LL_ADD_RULE, _LL_RESTRICT_SELF = 444, 445, 446  # the same number on every architecture
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_LL_REFER, _LL_TRUNCATE, _LL_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_LL_FILE_ACCESS = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | _LL_TRUNCATE | _LL_IOCTL_DEV


def _child_main() -> None:
    """The sandboxed child: read the request, put up the layers, run the code and tests, report, exit."""
    # Bound now: after the code has run, these are the only ways the nonce is touched.
    write, exit_, fstat, run = os.write, os._exit, os.fstat, _run_untrusted
    memory_error, base_exception = MemoryError, BaseException
    exit_memory, exit_tampered = _EXIT_MEMORY, _EXIT_TAMPERED

    request = json.loads(_read_stdin())
    nonce = request.pop("nonce").encode()
    report_fd = request["report_fd"]
    report_id = (fstat(report_fd).st_dev, fstat(report_fd).st_ino)
    workdir = os.getcwd()
    read_roots = list(dict.fromkeys([p for p in sys.path if p] + [os.path.realpath(p) for p in sys.path if p]
                                    + list(_SYSTEM_LIBRARIES)))

    skip = frozenset(request["skip"])
    layers = _kernel_layers(workdir, read_roots, request["memory_mb"], request["cpu_s"],
                            request["max_output_bytes"], skip)
    if "audit" not in skip:
        sys.addaudithook(_audit_hook(workdir, read_roots))
        layers.append("audit")
    write(report_fd, nonce + b" ready " + ",".join(layers).encode() + b"\n")

    try:
        status, bits, detail = run(request.pop("code"), request.pop("tests"))
        st = fstat(report_fd)
        if (st.st_dev, st.st_ino) != report_id:  # the code put a pipe of its own in its place
            exit_(exit_tampered)
        write(report_fd, b" ".join([nonce, status, bits, detail]) + b"\n")
    except memory_error:
        exit_(exit_memory)
    except base_exception:  # the code closed the pipe, or broke the interpreter: no report
        exit_(exit_tampered)
    exit_(0)  # no atexit handlers, no finalizers: nothing of the code's runs after the report


def _read_stdin() -> bytes:
    """All of stdin, then fd 0 becomes /dev/null: the nonce cannot be read a second time."""
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)  # the lowest free descriptor: 0 again
    return b"".join(chunks)


def _kernel_layers(workdir: str, read_roots: list[str], memory_mb: int, cpu_s: int, max_file_bytes: int,
                   skip: frozenset[str] = frozenset()) -> list[str]:
    """Put up the kernel's layers (each where this machine allows it) and return the names of those that held.
    ctypes is needed for them and then dropped from sys.modules, so that the code cannot import it again."""
    layers = []
    # With no Python-level handler left (SIGINT was the only one), none can ever be handed a frame; and
    # asyncio.run, which installs its own SIGINT handler only over the default one, does not try.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes
    except ImportError:  # a Python built without ctypes: rlimits only
        ctypes = None
    if ctypes is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        if "netns" not in skip and _unshare_network(libc):
            layers.append("netns")
        if "landlock" not in skip and _landlock(ctypes, libc, workdir, read_roots):
            layers.append("landlock")
        if "seccomp" not in skip and _seccomp(ctypes, libc):
            layers.append("seccomp")
        del libc, ctypes
        for name in [n for n in sys.modules if n in ("ctypes", "_ctypes") or n.startswith("ctypes.")]:
            del sys.modules[name]
    _set_rlimits(memory_mb, cpu_s, max_file_bytes)
    layers.append("rlimits")
    return layers


def _unshare_network(libc) -> bool:
    """An empty network namespace (and a private IPC one): as any user through a new user namespace, or as root
    directly. False where the kernel or its policy refuses both."""
    clone_newuser, clone_newnet, clone_newipc = 0x10000000, 0x40000000, 0x08000000
    return any(libc.unshare(flags) == 0 for flags in (clone_newuser | clone_newnet | clone_newipc,
                                                      clone_newnet | clone_newipc))


def _landlock(ctypes, libc, workdir: str, read_roots: list[str]) -> bool:
    """Restrict this process's filesystem (and, by ABI, TCP, signals, abstract sockets) with Landlock: read
    under `read_roots`, everything in `workdir`, /dev/null read-write. False where Landlock is unavailable."""
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(ctypes.c_long(_LL_CREATE_RULESET), None, ctypes.c_long(0), ctypes.c_long(1))  # ask the ABI
    if abi < 1:
        return False
    fs = (1 << 13) - 1 | (_LL_REFER if abi >= 2 else 0) | (_LL_TRUNCATE if abi >= 3 else 0)
    fs |= _LL_IOCTL_DEV if abi >= 5 else 0
    net = 0b11 if abi >= 4 else 0  # bind and connect TCP: handled, and no rule allows them
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets and signals beyond this sandbox
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24  # the attribute struct grew with the ABI

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    ruleset = syscall(ctypes.c_long(_LL_CREATE_RULESET), ctypes.byref(attr), ctypes.c_long(size),
                      ctypes.c_long(0))
    if ruleset < 0:
        return False
    read = _LL_READ_FILE | _LL_READ_DIR | _LL_EXECUTE
    rules = [(workdir, fs), ("/dev/null", _LL_READ_FILE | _LL_WRITE_FILE | _LL_TRUNCATE)]
    rules += [(p, read) for p in read_roots + list(_READABLE_FILES)]
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:  # not on this machine
                continue
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    access &= _LL_FILE_ACCESS  # directory rights on a file are an error
                rule = PathBeneath(access & fs, fd)
                if syscall(ctypes.c_long(_LL_ADD_RULE), ctypes.c_long(ruleset), ctypes.c_long(1),
                           ctypes.byref(rule), ctypes.c_long(0)) != 0:
                    return False
            finally:
                os.close(fd)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, which Landlock requires
            return False
        return syscall(ctypes.c_long(_LL_RESTRICT_SELF), ctypes.c_long(ruleset), ctypes.c_long(0)) == 0
    finally:
        os.close(ruleset)


def _seccomp(ctypes, libc) -> bool:
    """A classic-BPF seccomp filter: the syscalls in _SECCOMP_DENY_X86_64 fail with EPERM, a foreign syscall
    ABI kills the process, the rest is allowed. x86-64 only (the numbers are per architecture)."""
    if os.uname().machine != "x86_64":
        return False

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, errno_eperm, kill = 0x7FFF0000, 0x00050000 | 1, 0x80000000
    n = len(_SECCOMP_DENY_X86_64)
    deny_at = 6 + n  # index of the final "return EPERM"
    program = [(ld, 0, 0, 4), (jeq, 1, 0, _AUDIT_ARCH_X86_64), (ret, 0, 0, kill),  # seccomp_data.arch
               (ld, 0, 0, 0), (jge, deny_at - 5, 0, 0x40000000)]  # seccomp_data.nr; the x32 ABI
    program += [(jeq, deny_at - (5 + i) - 1, 0, nr) for i, nr in enumerate(_SECCOMP_DENY_X86_64)]
    program += [(ret, 0, 0, allow), (ret, 0, 0, errno_eperm)]
    filters = (SockFilter * len(program))(*[SockFilter(*ins) for ins in program])
    prog = SockFprog(len(program), filters)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, which an unprivileged filter requires
        return False
    return libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def _set_rlimits(memory_mb: int, cpu_s: int, max_file_bytes: int) -> None:
    """Soft = hard for every limit (a process may only lower a hard limit), except CPU: SIGXCPU one second
    before SIGKILL."""
    import resource

    limits = {resource.RLIMIT_AS: (memory_mb << 20,) * 2, resource.RLIMIT_CPU: (cpu_s, cpu_s + 1),
              resource.RLIMIT_FSIZE: (max_file_bytes,) * 2, resource.RLIMIT_NOFILE: (64, 64),
              resource.RLIMIT_NPROC: (0, 0), resource.RLIMIT_CORE: (0, 0)}
    for which, (soft, hard) in limits.items():
        old_hard = resource.getrlimit(which)[1]
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(which, (soft, hard))


def _normpath(path: str) -> str:
    """An absolute path with '.', '..' and repeated slashes resolved lexically (links are not followed: the
    audit hook refuses making them, and Landlock resolves the real ones)."""
    parts = []
    for part in path.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part and part != ".":
            parts.append(part)
    return "/" + "/".join(parts)


def _audit_hook(workdir: str, read_roots: list[str]):
    """The audit hook that polices the untrusted code (see the module docstring for what it refuses)."""
    # Bound now, before the code can patch os, stat, builtins or this module.
    getcwd, readlink, stat_, fspath, write, exit_ = os.getcwd, os.readlink, os.stat, os.fspath, os.write, os._exit
    is_dir, normpath, str_, bytes_, int_, type_ = stat.S_ISDIR, _normpath, str, bytes, int, type
    os_error, permission_error, runtime_error, value_error, import_error, base_exception = (
        OSError, PermissionError, RuntimeError, ValueError, ImportError, BaseException)
    violations, violation_prefixes, path_writes = _VIOLATIONS, _VIOLATION_PREFIXES, _PATH_WRITES
    introspection, frame_attributes, refused_imports = _INTROSPECTION, _FRAME_ATTRIBUTES, _REFUSED_IMPORTS
    write_flags, writable_files, readable_files = _WRITE_FLAGS, _WRITABLE_FILES, _READABLE_FILES
    exit_forbidden, exit_output, max_write_opens = _EXIT_FORBIDDEN, _EXIT_OUTPUT, _MAX_WRITE_OPENS
    af_unix = 1  # socket.AF_UNIX, without importing socket into the child
    roots = tuple(normpath(r) for r in read_roots)
    workdir = normpath(workdir)
    writes_left = [max_write_opens]

    def refuse(event: str, what) -> None:  # a violation: the run ends here, status "forbidden"
        what = what if type_(what) is str_ else ""
        write(2, str_.encode(f"\nsandbox: refused {event} {what}\n", "utf-8", "backslashreplace"))
        exit_(exit_forbidden)

    def count_write(event: str) -> None:
        writes_left[0] -= 1
        if writes_left[0] < 0:
            write(2, str_.encode(f"\nsandbox: refused {event}: more than {max_write_opens:d} files written\n"))
            exit_(exit_output)

    def resolve(path, dir_fd=-1):  # an absolute, normalised path as a str, or None
        if type_(path) is not str_ and type_(path) is not bytes_:
            try:
                path = fspath(path)  # a path-like object: see the module docstring about __fspath__
            except base_exception:
                return None
        if type_(path) is bytes_:
            path = bytes_.decode(path, "utf-8", "surrogateescape")
        if type_(path) is not str_:
            return None
        if not str_.startswith(path, "/"):
            try:
                base = getcwd() if dir_fd is None or dir_fd == -1 else readlink(f"/proc/self/fd/{dir_fd:d}")
            except (os_error, value_error):
                return None
            path = base + "/" + path
        return normpath(path)

    def inside(path, root: str) -> bool:
        return path is not None and (path == root or str_.startswith(path, root + "/"))

    def readable(path) -> bool:
        if path in readable_files or inside(path, workdir):
            return True
        for root in roots:
            if inside(path, root):
                return True
        return False

    def hook(event: str, args: tuple) -> None:
        if event == "socket.__new__" and args[1] == af_unix:
            return  # socketpair() (asyncio's self-pipe); connecting or binding one is refused below
        if event in violations or str_.startswith(event, violation_prefixes):
            refuse(event, "")
        elif event == "open":
            path, _, flags = args
            if type_(path) is int_:  # wraps a descriptor the process already holds
                return
            p = resolve(path)
            if type_(flags) is not int_ or flags & write_flags:
                if p in writable_files:
                    return
                if not inside(p, workdir):
                    refuse("open for writing", p)
                count_write(event)
            elif not readable(p):
                raise permission_error(f"sandbox: reading {p} is not allowed")
            elif not inside(p, workdir):
                try:
                    directory = is_dir(stat_(p).st_mode)
                except os_error:
                    directory = False
                if directory:  # a descriptor for dir_fd= outside the directory, which "open" events hide
                    raise permission_error(f"sandbox: opening the directory {p} is not allowed")
        elif event in path_writes:
            for path_at, dir_fd_at in path_writes[event]:
                path = args[path_at]
                if type_(path) is int_:
                    if event != "os.truncate":  # fchmod & co. work on read-only descriptors
                        refuse(event, f"on descriptor {path:d}")
                    continue
                p = resolve(path, -1 if dir_fd_at is None else args[dir_fd_at])
                if not inside(p, workdir):
                    refuse(event, p)
            if event == "os.mkdir":
                count_write(event)
        elif event in ("os.listdir", "os.scandir"):
            path = args[0]
            if path is not None and type_(path) is not int_ and not readable(resolve(path)):
                raise permission_error("sandbox: listing a directory outside the allowed ones is not allowed")
        elif event == "import":
            if type_(args[0]) is not str_:
                raise import_error("sandbox: a module name must be a str")
            if args[0] in refused_imports:
                raise import_error(f"sandbox: importing {args[0]} is not allowed")
        elif event == "sys._getframe":
            # What CPython raises for a frame beyond the stack; namedtuple, enum, typing and logging cope.
            raise value_error("sandbox: frames are not available")
        elif event in introspection:
            raise runtime_error(f"sandbox: {event} is not allowed")
        elif event == "object.__getattr__" and type_(args[1]) is str_ and args[1] in frame_attributes:
            raise runtime_error(f"sandbox: reading {args[1]} is not allowed")

    return hook


def _describe_exception(prefix: str, exc: BaseException, *, _type=type, _str=str, _encode=str.encode,
                        _hex=bytes.hex, _BaseException=BaseException) -> bytes:
    """`<prefix><ExceptionType>: <message>`, cut to 300 characters, UTF-8 then hex: exact bytes whatever the
    exception's class or __str__ do (the code may define both)."""
    try:
        name = _type(exc).__name__
        message = _str(exc)
        name = name if _type(name) is _str else "?"
        message = message if _type(message) is _str else "?"
    except _BaseException:
        name, message = "?", "?"
    text = f"{prefix}{name}: {message}" if message else f"{prefix}{name}"
    return _encode(_hex(_encode(text[:300], "utf-8", "backslashreplace")), "ascii")


def _run_untrusted(code: str, tests: list[str], *, _exec=exec, _compile=compile, _MemoryError=MemoryError,
                   _Exception=Exception, _BaseException=BaseException,
                   _describe=_describe_exception) -> tuple[bytes, bytes, bytes]:
    """Compile the code and tests, run the code, then each test, in one namespace. Returns (status, bits,
    detail): status b"done" (bits: b"1" per passed test, b"0" per failed one), b"syntax_error", b"memory" or
    b"crash" (bits b"-"); detail is hex of a short UTF-8 reason, or b"-". All three are exact bytes built from
    constants, since by the time they are built the code may have patched anything reachable."""
    describe = _describe  # a local: the default was bound when this module was loaded
    try:
        compiled = _compile(code, "<solution>", "exec")
    except (SyntaxError, ValueError) as e:  # ValueError: null bytes in the source
        return b"syntax_error", b"-", describe("solution: ", e)
    except _BaseException as e:  # MemoryError, RecursionError: a pathological source
        return b"crash", b"-", describe("solution: ", e)
    compiled_tests = [_compile(test, f"<test {i}>", "exec") for i, test in enumerate(tests)]
    # Not "__main__": a completion's `if __name__ == "__main__": main()` would read the (empty) stdin.
    namespace = {"__name__": "solution", "__builtins__": builtins}

    try:
        _exec(compiled, namespace)
    except _MemoryError as e:
        namespace.clear()  # give the memory back, so that the report can be written
        return b"memory", b"-", describe("solution: ", e)
    except _BaseException as e:  # an exception at import time, SystemExit, KeyboardInterrupt
        return b"crash", b"-", describe("solution: ", e)

    bits, detail, i = [], b"-", 0
    for test in compiled_tests:
        try:
            _exec(test, namespace)
            bits.append(b"1")
        except _MemoryError as e:
            namespace.clear()
            return b"memory", b"-", describe(f"test {i:d}: ", e)
        except _Exception as e:
            bits.append(b"0")
            if detail == b"-":
                detail = describe(f"test {i:d}: ", e)
        except _BaseException as e:  # SystemExit, KeyboardInterrupt: the run ends here
            return b"crash", b"-", describe(f"test {i:d}: ", e)
        i += 1
    return b"done", b"".join(bits), detail


if __name__ == "__main__":
    _child_main()
