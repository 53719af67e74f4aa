// node validate.mjs FILE.json...: each object (a ServiceMonitor or a PrometheusRule) checked
// against the JSON schema of its CRD, as @kubernetes-models/prometheus-operator compiles it from
// the Prometheus Operator's CRDs. Exit 1 if one does not validate or is of another kind.
//
// The schema is the CRD's openAPIV3Schema, which (like the API server) does not reject unknown
// fields: a misspelt optional field is pruned by the server, not refused; the fields this
// project sets are checked for type, pattern and enum.
import { readFileSync } from "node:fs";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const models = { ServiceMonitor, PrometheusRule };
let failed = 0;
for (const file of process.argv.slice(2)) {
  const object = JSON.parse(readFileSync(file, "utf8"));
  const Model = models[object.kind];
  try {
    if (!Model || object.apiVersion !== "monitoring.coreos.com/v1") {
      throw new Error(`no CRD schema here for ${object.apiVersion} ${object.kind}`);
    }
    new Model(object).validate();
    console.log(`PASS ${file}: ${object.kind} ${object.metadata.name} validates against its CRD schema`);
  } catch (error) {
    failed += 1;
    console.log(`FAIL ${file}: ${error.message}`);
  }
}
process.exit(failed === 0 ? 0 : 1);
