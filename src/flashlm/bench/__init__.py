"""Measurement: the paper's Tables 2-3 (`paper`), the engine bench (`engine`), the flash-read
bench and its workloads (`io`, `io_workloads`), the 7B-scale I/O simulation (`scale`), the
neuron cache policies (`cache`), perplexity against bytes read per selection (`accuracy`,
`flashlm eval`), trace reports and plots (`trace_report`), the RSS probe (`rss_probe`).

Built on the engine's public pieces; nothing in the engine (`flashlm.io`, `flashlm.models`,
`flashlm.pipeline`) imports it. The `flashlm bench`, `flashlm eval` and `flashlm trace
report` commands run it.
"""
