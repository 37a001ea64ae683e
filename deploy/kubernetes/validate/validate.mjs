// Validates Prometheus Operator objects against the operator's API schema
// (compiled from its Go types by @kubernetes-models/prometheus-operator).
// Input: a JSON array of objects on stdin. Output: one line per object;
// exit 1 if any is invalid or of a kind the package does not know.
import { readFileSync } from "node:fs";

const objects = JSON.parse(readFileSync(0, "utf8"));
let failed = false;
for (const object of objects) {
  const name = `${object.kind}/${object.metadata?.name}`;
  const [group, version] = String(object.apiVersion).split("/");
  let Model;
  try {
    const module = await import(
      `@kubernetes-models/prometheus-operator/${group}/${version}/${object.kind}`
    );
    Model = module[object.kind];
  } catch {
    Model = undefined;
  }
  if (!Model) {
    console.log(`error ${name}: no schema for ${object.apiVersion} ${object.kind}`);
    failed = true;
    continue;
  }
  try {
    new Model(object).validate();
    console.log(`ok ${name}`);
  } catch (error) {
    console.log(`error ${name}: ${String(error.message).split("\n").join("; ")}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
