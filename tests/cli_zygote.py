"""A process that imports what `effitrain` needs once, then forks one child per CLI call the tests
make: each child is `python -m effitrain.cli ARGS` (runpy runs the module as __main__, as `-m`
does) in its own folder, environment, stdin, stdout and stderr, without paying torch's import
again (6 of a tiny run's 9 seconds), nor the teardown of every module at exit: the child waits for its
threads and runs the exit handlers as the interpreter would, then ends. Nothing here runs a tensor
op before forking, so no thread pool is copied into a child.

Protocol, one JSON or integer line each way on stdin/stdout:
    request {"args", "cwd", "env", "stdout", "stderr"}  ->  child's pid, then its exit code
    (negative: the signal that ended it, as subprocess reports it).
"""

from __future__ import annotations

import importlib
import io
import json
import os
import sys

# Not effitrain.cli itself: runpy runs it as __main__ (and warns when it is already imported).
# Not onnxruntime: its import starts threads, and a child forked with their locks held hangs.
PRELOAD = ["effitrain.pipeline", "effitrain.stages", "effitrain.runs", "effitrain.export", "effitrain.report",
           "torch.utils.tensorboard", "torchvision", "transformers", "sklearn.datasets", "onnx", "matplotlib", "submitit",
           "hydra_plugins"]


def serve() -> dict:
    """Answer requests until stdin closes; returns a request in the forked child only."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)  # nothing printed while importing can garble the replies
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # an optional extra that is not installed: the child imports what it needs
            pass
    replies.write("ready\n")
    while line := sys.stdin.readline():
        request = json.loads(line)
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            replies.close()
            os.dup2(null, 0)
            os.close(null)
            return request
        replies.write(f"{pid}\n")
        _, status = os.waitpid(pid, 0)
        replies.write(f"{os.waitstatus_to_exitcode(status)}\n")
    sys.exit(0)


def become(request: dict) -> None:
    """In the child: take the call's folder, environment and files, then run the CLI as `-m` would."""
    import atexit
    import random
    import runpy
    import threading
    import traceback

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(file, fd)
        os.close(file)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True, errors="backslashreplace")
    # `python -m` puts the working folder first, then PYTHONPATH, then the installation's paths
    # (the zygote's own first entry, this script's folder, is not one of them).
    extra = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path]
    sys.path[:] = [request["cwd"], *extra, *sys.path[1:]]
    importlib.invalidate_caches()
    random.seed()  # a fresh process's own draw, not the zygote's
    sys.argv = ["-m", *request["args"]]
    try:
        runpy.run_module("effitrain.cli", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        if not isinstance(exit.code, int) and exit.code is not None:
            print(exit.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    # What the interpreter does on exit, less the teardown of every module (seconds with this many):
    threading._shutdown()  # waits for the threads the run left running, as Python does
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    become(serve())
