// Validate Prometheus Operator resources against the JSON schemas that
// @kubernetes-models/prometheus-operator generates from the operator's own API types.
// stdin: a JSON array of resources; prints one line per resource; exit 1 if any is invalid.
import { readFileSync } from "node:fs";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const KINDS = { PodMonitor, PrometheusRule, ServiceMonitor };
let failed = false;
for (const doc of JSON.parse(readFileSync(0, "utf8"))) {
  const Model = KINDS[doc.kind];
  const name = `${doc.kind}/${doc.metadata?.name}`;
  if (!Model || doc.apiVersion !== Model.apiVersion) {
    console.log(`${name}: no schema for ${doc.apiVersion} ${doc.kind}`);
    failed = true;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`${name}: valid`);
  } catch (err) {
    console.log(`${name}: INVALID ${err.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
