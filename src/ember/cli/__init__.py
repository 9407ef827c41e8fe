"""The `ember` command: the server and cluster roles, and the client commands (deploy, invoke, ls, logs, top)."""
