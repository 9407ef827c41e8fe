"""ember's sans-IO core: pure state machines for assignment and keep-alive, driven by the server,
the trace simulator and the model tests alike."""
