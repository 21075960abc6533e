"""The code sandbox: scores follow the tests, and every way out (loops, memory, output, files, network,
processes, forged reports) scores 0 and leaves nothing behind: no process, no file, no throwaway directory.

Escape tests run three ways where it matters: with every layer, with the audit hook alone (a machine without
user namespaces, Landlock or seccomp) and with the kernel layers alone (skipped where they did not engage here)."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import tracemalloc
import uuid
from pathlib import Path

import pytest

from dsv3.train import sandbox
from dsv3.train.sandbox import SandboxResult, code_reward, extract_code, run_tests

pytestmark = pytest.mark.skipif(not os.uname().sysname == "Linux", reason="the sandbox runs code on Linux only")

ADD_TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]
ADD = "def add(a, b):\n    return a + b\n"
KERNEL_LAYERS = frozenset({"netns", "landlock", "seccomp"})
LAYER_MODES = {"all": frozenset(), "audit only": KERNEL_LAYERS, "kernel only": frozenset({"audit"})}


@pytest.fixture(autouse=True)
def nothing_left_behind(monkeypatch):
    """Record every sandbox's process and directory; after the test, none may remain."""
    pids, dirs = [], []
    real_popen, real_mkdtemp = subprocess.Popen, tempfile.mkdtemp

    def popen(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        pids.append(proc.pid)
        return proc

    def mkdtemp(*args, **kwargs):
        dirs.append(real_mkdtemp(*args, **kwargs))
        return dirs[-1]

    monkeypatch.setattr(sandbox.subprocess, "Popen", popen)
    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", mkdtemp)
    yield pids
    for pid in pids:  # the child led its own session and process group: nothing may be left in it
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    for d in dirs:
        assert not os.path.lexists(d), f"throwaway directory {d} left behind"


@pytest.fixture(params=list(LAYER_MODES))
def layer_mode(request, monkeypatch):
    monkeypatch.setattr(sandbox, "_SKIP_LAYERS", LAYER_MODES[request.param])
    return request.param


def needs(result: SandboxResult, mode: str, *layers: str) -> None:
    """In "kernel only" mode the check means something only where one of `layers` engaged on this machine."""
    if mode == "kernel only" and not set(layers) & set(result.layers):
        pytest.skip(f"none of {layers} engaged on this machine (got {result.layers})")


# --- scores ------------------------------------------------------------------------------------------------------

def test_correct_code_scores_one():
    r = run_tests(ADD, ADD_TESTS)
    assert (r.status, r.passed, r.total, r.score) == ("ok", 3, 3, 1.0)
    assert {"rlimits", "audit"} <= set(r.layers)


def test_partly_correct_code_scores_the_fraction():
    r = run_tests("def add(a, b):\n    return abs(a) + b\n", ADD_TESTS)  # wrong only for add(-1, 1)
    assert (r.status, r.passed, r.total) == ("failed", 2, 3)
    assert r.score == pytest.approx(2 / 3)
    assert r.detail.startswith("test 1: AssertionError")


def test_syntax_error_scores_zero():
    r = run_tests("def add(a, b)\n    return a + b\n", ADD_TESTS)
    assert (r.status, r.score) == ("syntax_error", 0.0)
    assert "SyntaxError" in r.detail


@pytest.mark.parametrize("code", ["import os; os._exit(3)", "raise SystemExit", "raise SystemExit(0)",
                                  "import os; os.abort()", ADD + "raise KeyError('at import')"])
def test_crash_scores_zero(code):
    r = run_tests(code, ADD_TESTS)
    assert (r.status, r.score) == ("crash", 0.0)


def test_a_test_that_exits_ends_the_run():
    r = run_tests(ADD, ["assert add(1, 1) == 2", "raise SystemExit(0)", "assert add(1, 2) == 3"])
    assert (r.status, r.score) == ("crash", 0.0)


def test_common_stdlib_works_and_main_guard_does_not_run():
    code = ADD + (
        "import asyncio, collections, dataclasses, enum, json, logging, re, tempfile, typing\n"
        "P = collections.namedtuple('P', 'x y')\n"
        "Color = enum.Enum('Color', 'RED GREEN')\n"
        "class T(typing.NamedTuple):\n    a: int\n"
        "logging.getLogger('x').warning('logging works')\n"
        "with tempfile.TemporaryFile() as f:\n    f.write(b'scratch')\n"
        "async def twice(x):\n    return 2 * x\n"
        "if __name__ == '__main__':\n    input()\n")
    tests = ["assert P(1, 2).y == 2 and Color.RED.value == 1 and T(3).a == 3",
             "assert asyncio.run(twice(4)) == 8", "assert json.loads(json.dumps([1])) == [1]"]
    r = run_tests(code, tests)
    assert (r.status, r.score) == ("ok", 1.0), r.detail


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="test 1 does not compile"):
        run_tests(ADD, ["assert True", "assert ("])
    with pytest.raises(ValueError, match="tests is empty"):
        run_tests(ADD, [])
    with pytest.raises(ValueError, match="memory_mb"):
        run_tests(ADD, ADD_TESTS, memory_mb=8)


def test_score_is_zero_for_every_status_but_ok_and_failed():
    assert SandboxResult(3, 3, "ok").score == 1.0
    assert SandboxResult(1, 4, "failed").score == 0.25
    for status in ("timeout", "memory", "output_limit", "crash", "forbidden", "syntax_error"):
        assert SandboxResult(3, 3, status).score == 0.0


# --- limits ------------------------------------------------------------------------------------------------------

def test_infinite_loop_times_out_and_leaves_no_process(nothing_left_behind):
    r = run_tests("while True:\n    pass\n", ADD_TESTS, timeout_s=1)
    assert (r.status, r.score) == ("timeout", 0.0)
    (pid,) = nothing_left_behind
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_a_test_that_loops_times_out():
    r = run_tests(ADD, ["assert add(1, 1) == 2", "while True: pass"], timeout_s=1)
    assert (r.status, r.score) == ("timeout", 0.0)


@pytest.mark.parametrize("code", ["x = bytearray(10**10)",
                                  "x = []\nwhile True:\n    x.append(bytearray(1 << 20))\n"])
def test_memory_bomb_scores_zero(code):
    r = run_tests(code + "\n" + ADD, ADD_TESTS, memory_mb=256)
    assert (r.status, r.score) == ("memory", 0.0)


@pytest.mark.parametrize("code", ["print('x' * 10**8)", "while True:\n    print('x')\n",
                                  "import sys\nwhile True:\n    sys.stderr.write('y' * 1000)\n"])
def test_huge_output_scores_zero_and_the_parent_stays_small(code):
    tracemalloc.start()
    try:
        r = run_tests(ADD + code, ADD_TESTS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (r.status, r.score) == ("output_limit", 0.0)
    assert peak < 4 << 20, f"the parent held {peak} bytes: output must be read incrementally, not buffered"


def test_a_file_past_the_size_cap_fails_to_write():
    r = run_tests(ADD + "open('big', 'wb').write(b'x' * 100_000)\n", ADD_TESTS, max_output_bytes=50_000)
    assert r.score == 0.0
    assert "File too large" in r.detail


def test_too_many_files_is_an_output_limit():
    code = ADD + "for i in range(100):\n    open(f'f{i}', 'w').close()\n"
    r = run_tests(code, ADD_TESTS)
    assert (r.status, r.score) == ("output_limit", 0.0)


# --- files -------------------------------------------------------------------------------------------------------

def test_writing_inside_its_directory_is_allowed():
    code = ADD + (
        "import os, pathlib\n"
        "os.mkdir('sub')\n"
        "pathlib.Path('sub/a.txt').write_text('hello')\n"
        "os.rename('sub/a.txt', 'b.txt')\n"
        "with open(os.devnull, 'w') as f:\n    f.write('discarded')\n")
    r = run_tests(code, ["assert open('b.txt').read() == 'hello'", "assert os.listdir('sub') == []"])
    assert (r.status, r.score) == ("ok", 1.0), r.detail


def test_directory_made_unreadable_is_still_removed():
    code = ADD + "import os\nos.makedirs('a/b')\nopen('a/b/f', 'w').close()\nos.chmod('a/b', 0)\nos.chmod('a', 0)\n"
    r = run_tests(code, ADD_TESTS)
    assert r.status == "ok"  # and the fixture checks the directory is gone


@pytest.fixture
def outside(tmp_path):
    """Paths the sandbox must not create: one the test owns, one in the user's home."""
    targets = [tmp_path / "escaped", Path.home() / f".dsv3-sandbox-probe-{uuid.uuid4().hex}"]
    yield targets
    for t in targets:
        if t.is_dir():
            t.rmdir()
        elif t.exists():
            t.unlink()


WRITES = {
    "open": "open(P, 'w').write('x')",
    "pathlib": "import pathlib; pathlib.Path(P).write_text('x')",
    "os.open": "import os; os.close(os.open(P, os.O_WRONLY | os.O_CREAT))",
    "mkdir": "import os; os.mkdir(P)",
    "rename": "open('mine', 'w').close(); import os; os.rename('mine', P)",
    "symlink": "import os; os.symlink(P, 'link'); open('link', 'w').write('x')",
    "dir_fd": "import os; d = os.open(os.path.dirname(P), os.O_RDONLY); "
              "os.close(os.open(os.path.basename(P), os.O_WRONLY | os.O_CREAT, dir_fd=d))",
    "relative": "open('../' * 20 + P.lstrip('/'), 'w').write('x')",
}


@pytest.mark.parametrize("how", list(WRITES))
def test_writes_outside_score_zero_and_create_nothing(how, layer_mode, outside):
    for target in outside:
        r = run_tests(ADD + f"P = {str(target)!r}\n" + WRITES[how], ADD_TESTS)
        created = target.exists() or target.is_symlink()
        needs(r, layer_mode, "landlock")
        assert not created, f"{how} created {target} ({r})"
        assert r.score == 0.0, r
        if layer_mode != "kernel only":
            assert r.status in ("forbidden", "crash"), r


def test_reading_outside_is_refused(tmp_path, layer_mode):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    r = run_tests(f"print(open({str(secret)!r}).read())\n" + ADD, ADD_TESTS)
    needs(r, layer_mode, "landlock")
    assert (r.status, r.score) == ("crash", 0.0)
    assert "ermission" in r.detail


# --- network and processes ---------------------------------------------------------------------------------------

def test_socket_connect_scores_zero_and_reaches_nothing(layer_mode):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        port = listener.getsockname()[1]
        code = ADD + f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=0.5)\n" \
                     f"s.sendall(b'escaped')\n"
        r = run_tests(code, ADD_TESTS)
        needs(r, layer_mode, "netns", "seccomp")  # Landlock covers TCP only from ABI 4
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert r.score == 0.0, r
    if layer_mode != "kernel only":
        assert r.status == "forbidden" and "socket" in r.detail, r


PROCESSES = {
    "os.system": "import os; os.system('touch ' + P)",
    "subprocess": "import subprocess; subprocess.run(['touch', P])",
    "fork": "import os\nif os.fork() == 0:\n    open(P, 'w').close()\n    os._exit(0)\n",
    "exec": "import os; os.execv('/usr/bin/touch', ['touch', P])",
    "posix_spawn": "import os; os.posix_spawn('/usr/bin/touch', ['touch', P], {})",
}


@pytest.mark.parametrize("how", list(PROCESSES))
def test_processes_are_refused(how, layer_mode, tmp_path):
    target = tmp_path / "spawned"
    r = run_tests(ADD + f"P = {str(target)!r}\n" + PROCESSES[how], ADD_TESTS)
    needs(r, layer_mode, "seccomp")
    assert not target.exists()
    if layer_mode != "kernel only":  # the kernel refuses quietly (os.system returns an error code)
        assert (r.status, r.score) == ("forbidden", 0.0), r


def test_signalling_the_parent_is_refused(layer_mode):
    r = run_tests(ADD + f"import os\nos.kill({os.getpid()}, 0)\n", ADD_TESTS)  # signal 0: only a check
    needs(r, layer_mode, "seccomp")
    assert r.score == 0.0, r


# --- forged results ----------------------------------------------------------------------------------------------

def test_printing_a_fake_result_scores_zero():
    fake = "0123456789abcdef0123456789abcdef done 111 -\n"
    code = ("import os\n"
            f"print({fake!r})\n"
            "for fd in range(1, 64):\n"
            "    try:\n"
            f"        os.write(fd, {fake.encode()!r})\n"
            "    except OSError:\n"
            "        pass\n"
            "os._exit(0)\n")
    r = run_tests(code, ADD_TESTS)
    assert r.score == 0.0 and r.status == "forbidden", r


FIND_THE_NONCE = """
import gc, os, sys
def frames():
    try:
        yield sys._getframe(0)
    except Exception:
        pass
    try:
        raise ValueError
    except ValueError as e:
        try:
            yield e.__traceback__.tb_frame
        except Exception:
            pass
for f in frames():
    while f is not None:
        if "nonce" in f.f_locals:
            os.write(f.f_locals["report_fd"], f.f_locals["nonce"] + b" done 111 -\\n")
            os._exit(0)
        f = f.f_back
try:
    for o in gc.get_objects():
        pass
except Exception:
    pass
"""


def test_the_nonce_is_out_of_reach_of_frame_walking():
    r = run_tests(FIND_THE_NONCE, ADD_TESTS)
    assert (r.status, r.score) == ("failed", 0.0), r
    assert "NameError" in r.detail  # the walk found nothing, so the tests ran (and found no add)


# --- extract_code and code_reward --------------------------------------------------------------------------------

def test_extract_code_picks_the_last_python_block():
    completion = ("First try:\n```python\ndef f(): return 1\n```\nshell:\n```bash\nls\n```\n"
                  "Final answer:\n```py\ndef f(): return 2\n```\nDone.")
    assert extract_code(completion) == "def f(): return 2\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```Python3\nx = 3\n```\n```cpp\nint x;\n```") == "x = 3\n"
    assert extract_code("no code here") is None
    assert extract_code("```python\nnever closed\n") is None


def test_code_reward_scores_each_completion_in_order():
    completions = [f"```python\n{ADD}```", "```python\ndef add(a, b):\n    return abs(a) + b\n```",
                   "I don't know.", "```python\nwhile True:\n    pass\n```"]
    scores = code_reward(completions, [ADD_TESTS] * 4, timeout_s=2)
    assert scores == [1.0, pytest.approx(2 / 3), 0.0, 0.0]
    with pytest.raises(ValueError, match="one list per completion"):
        code_reward(completions, [ADD_TESTS])
