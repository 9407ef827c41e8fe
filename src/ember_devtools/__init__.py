"""Harnesses that drive ember from outside, for tests, benchmarks and `ember cluster up`: a real etcd, a local
cluster of processes, network namespaces and the chaos runner. The product (the `ember` package) never imports
this package except where the CLI starts a local cluster on request."""
