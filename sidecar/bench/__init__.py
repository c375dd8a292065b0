"""``fse-sidecar bench``: the benchmarks, apart from the product. Each suite is a module
named as on the command line (``guard`` is the default one: transport, metrics, the fast
lane, the audit file, the exporter and the model loop); ``common`` holds what they share.
Every comparison is measured side by side in one run and reported as medians of pair-by-pair
ratios: these machines are shared and noisy, so no benchmark asserts a time."""
