"""How an accepted invocation reaches a sandbox: the `Invoker` seam, the single-node invoker driving the core
Assigner, and the durable queue of asynchronous invocations."""
