"""What operators see: Prometheus metrics, function logs, structured server logs, request ids and the
operations view."""
