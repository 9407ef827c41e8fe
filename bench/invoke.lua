-- wrk script: POST {} to the invoke path and print the full result as one JSON line.
-- done() reads wrk's own HdrHistogram, so p99.9 comes from the same data as wrk's --latency.
wrk.method = "POST"
wrk.body = "{}"
wrk.headers["Content-Type"] = "application/json"
-- EMBER_INVOCATION_TYPE=Event makes these asynchronous invokes (bench/async_bench.py)
local invocation_type = os.getenv("EMBER_INVOCATION_TYPE")
if invocation_type then wrk.headers["X-Amz-Invocation-Type"] = invocation_type end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,' ..
    '"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p99.9":%d,"p99.99":%d}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency:percentile(99.99)))
end
