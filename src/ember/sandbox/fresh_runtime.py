"""A pooled Python runtime when the zygote is off: run inside the sandbox as `python -c <this file> READY_FD`.

It imports awslambdaric (the slow part of a cold start), says so on READY_FD, then waits for one line
of JSON on stdin (`{"env": {...}, "handler": "..."}`, written by ember.sandbox.pool) and becomes that
function's runtime. It must not import ember: no ember file is visible in the sandbox.
"""

import concurrent.futures.thread  # noqa: F401 - likewise
import contextlib
import json
import os
import sys

import awslambdaric.__main__ as _main
import awslambdaric.bootstrap as _bootstrap
import awslambdaric.lambda_literals  # noqa: F401 - imported lazily on the way to /next: pay for it now


def main() -> None:
    ready = int(sys.argv[1])
    with contextlib.suppress(OSError):  # EPIPE when ember took this runtime before it was ready: fine
        os.write(ready, b"R")
    os.close(ready)
    line = sys.stdin.buffer.readline()
    if not line:
        os._exit(0)
    spec = json.loads(line)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.environ.clear()
    os.environ.update(spec["env"])
    _bootstrap._AWS_LAMBDA_LOG_FORMAT = _bootstrap.LogFormat.from_str(os.environ.get("AWS_LAMBDA_LOG_FORMAT"))
    _bootstrap._AWS_LAMBDA_LOG_LEVEL = _bootstrap._get_log_level_from_env_var(os.environ.get("AWS_LAMBDA_LOG_LEVEL"))
    os.chdir("/var/task")
    sys.path[0] = "/var/task"
    sys.argv = ["awslambdaric", spec["handler"]]
    _main.main(sys.argv)


if __name__ == "__main__":
    main()
