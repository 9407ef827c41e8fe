"""Cluster mode: the protocol of spec/ember.pml on etcd, one role per process.

- frontend (`ember.cluster.frontend`): the Lambda API; acquires a sandbox from the partition's leader
  and sends the payload straight to the worker (`ember.core.call` decides retries).
- assigner (`ember.cluster.assigner`): campaigns for every partition; as leader it runs
  `ember.core.partition.Leader` (busy/idle in memory, the journal in etcd, reconciliation, probes).
- worker (`ember.cluster.worker`): hosts sandboxes; `ember.core.host.Host` is its source of truth and
  where fencing happens.
The etcd keys and wire messages are in `ember.cluster.layout`; docs/decisions/0007 records them.
"""

import os

# Workers fork sandboxes while gRPC (etcd's client) runs threads: gRPC's fork handlers only log noise.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
