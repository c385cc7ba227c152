// Validates rendered Istio resources against Istio's own CRD schemas (@kubernetes-models/istio, generated from
// Istio's CRDs). Reads a JSON array of manifests on stdin; exits 1 naming the first invalid one.
import { PeerAuthentication, AuthorizationPolicy } from '@kubernetes-models/istio/security.istio.io/v1beta1';

const kinds = { PeerAuthentication, AuthorizationPolicy };
const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const docs = JSON.parse(Buffer.concat(chunks).toString());
let checked = 0;
for (const doc of docs) {
  const Model = kinds[doc.kind];
  if (!Model || doc.apiVersion !== 'security.istio.io/v1beta1') {
    process.stderr.write(`no schema for ${doc.apiVersion} ${doc.kind}\n`);
    process.exit(1);
  }
  try {
    new Model(doc).validate();
  } catch (err) {
    process.stderr.write(`${doc.kind} ${doc.metadata.name}: ${err.message}\n`);
    process.exit(1);
  }
  checked += 1;
}
process.stdout.write(`${checked} Istio resources valid\n`);
