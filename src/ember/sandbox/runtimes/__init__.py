"""Runtimes ember starts that are not Python's awslambdaric: Node.js, through ember's own runtime client
(`node/index.mjs`, plain Node, no dependencies; docs/decisions/0009-nodejs-runtime.md).

nodejs18.x, nodejs20.x and nodejs22.x all run on the host's `node` (`EMBER_NODE`, else the first `node` on
PATH): ember does not install Node versions. Whichever major version that is, a function gets the
AWS_EXECUTION_ENV of the runtime it asked for. In a sandbox the client's directory is bound read-only at
/var/runtime (ember.sandbox.jail), Lambda's LAMBDA_RUNTIME_DIR, and nothing else of ember's is visible.
"""

from __future__ import annotations

import functools
import os
import shutil
from importlib import resources

NODE_RUNTIMES = ("nodejs18.x", "nodejs20.x", "nodejs22.x")
# the directory of index.mjs (a real directory: ember is installed from source or a wheel, not a zip)
NODE_CLIENT_DIR = os.path.realpath(str(resources.files("ember.sandbox.runtimes").joinpath("node")))
NODE_CLIENT = os.path.join(NODE_CLIENT_DIR, "index.mjs")
IN_SANDBOX = "/var/runtime"  # where a sandbox sees NODE_CLIENT_DIR


@functools.cache
def node_binary() -> str:
    """The node that runs every nodejs runtime: EMBER_NODE, else `node` on ember's PATH (resolved, so the
    sandbox sees the real file), else /usr/bin/node (a spawn then says it is missing)."""
    found = os.environ.get("EMBER_NODE") or shutil.which("node") or "/usr/bin/node"
    return os.path.realpath(found) if os.path.exists(found) else found


def node_argv(memory_mb: int) -> list[str]:
    """Lambda's Node.js bootstrap sizes V8's heap from the function's memory; so does ember. It costs ~20 ms
    of every cold start (any V8 flag makes node compile its internal modules without their embedded code
    cache), but without it a sandboxed node, which cannot see its cgroup, sizes its heap from the host's
    memory (4 GB here) and a 128 MB function is OOM-killed before V8 collects (decision 0009)."""
    semi_space = memory_mb // 64 // 2
    old_space = memory_mb - memory_mb // 64
    return [node_binary(), f"--max-semi-space-size={semi_space}", f"--max-old-space-size={old_space}", NODE_CLIENT]


def node_path(runtime: str, task_root: str) -> str:
    """NODE_PATH as Lambda sets it: layers' node_modules (per major version, then common), the runtime's
    directory, the function's code."""
    major = runtime.removeprefix("nodejs").partition(".")[0]
    return ":".join(
        [f"/opt/nodejs/node{major}/node_modules", "/opt/nodejs/node_modules", f"{NODE_CLIENT_DIR}/node_modules",
         NODE_CLIENT_DIR, task_root]
    )  # fmt: skip


def node_prefix_outside_usr() -> set[str]:
    """The prefix of a node installed outside /usr, /bin and /lib* (e.g. ~/.nvm/versions/node/vX: its
    bin/node and lib/), which a sandbox must see at its own path; none for a system node."""
    node = node_binary()
    if os.path.isabs(node) and os.path.exists(node):
        top = node.split("/")[1]
        if top not in ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            return {os.path.dirname(os.path.dirname(node))}
    return set()
