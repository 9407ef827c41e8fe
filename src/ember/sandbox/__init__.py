"""Everything about one sandbox's life: the process and its Runtime API endpoint, the host that runs the
lifecycle for both modes, isolation (spawn and jail), cgroups, the pool and zygote."""
