// @grpc/grpc-js + @grpc/proto-loader against a Workload API socket, from the
// public proto (proto/spiffe/workload.proto).
//
// Usage: node grpc_js_x509.js SOCKET UPDATE_TIMEOUT_SECONDS
// Fetches the bundles and an SVID, reads the SVID stream until a renewal
// arrives, and prints one JSON object (the last stdout line).
'use strict';
const path = require('path');
const crypto = require('crypto');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const [socket, updateTimeout] = [process.argv[2], Number(process.argv[3])];
const repo = path.resolve(__dirname, '..', '..');

function fail(msg) {
  console.error(msg);
  process.exit(1);
}

// Concatenated DER certificates, as the Workload API sends them.
function splitDer(buf) {
  const certs = [];
  let at = 0;
  while (at < buf.length) {
    if (buf[at] !== 0x30) fail('not a DER SEQUENCE');
    let len = buf[at + 1];
    let hdr = 2;
    if (len & 0x80) {
      const n = len & 0x7f;
      len = 0;
      for (let i = 0; i < n; i++) len = len * 256 + buf[at + 2 + i];
      hdr += n;
    }
    certs.push(new crypto.X509Certificate(buf.subarray(at, at + hdr + len)));
    at += hdr + len;
  }
  return certs;
}

const fp = (c) => crypto.createHash('sha256').update(c.raw).digest('hex');

function describe(svid) {
  const chain = splitDer(svid.x509_svid);
  const key = crypto.createPrivateKey({ key: svid.x509_svid_key, format: 'der', type: 'pkcs8' });
  return {
    spiffe_id: svid.spiffe_id,
    uri_sans: (chain[0].subjectAltName || '').split(', ').filter((s) => s.startsWith('URI:')).map((s) => s.slice(4)),
    leaf: fp(chain[0]),
    chain: chain.map(fp),
    key_matches_cert: chain[0].checkPrivateKey(key),
    key: crypto.createHash('sha256').update(svid.x509_svid_key).digest('hex'),
    bundle: splitDer(svid.bundle).map(fp).sort(),
  };
}

const def = loader.loadSync(path.join(repo, 'proto/spiffe/workload.proto'), {
  keepCase: true,
  includeDirs: [path.join(repo, 'proto/spiffe')],
});
const api = grpc.loadPackageDefinition(def);
const client = new api.SpiffeWorkloadAPI('unix://' + socket, grpc.credentials.createInsecure());
const md = new grpc.Metadata();
md.set('workload.spiffe.io', 'true');
const out = {};

const timer = setTimeout(() => fail(`no renewal within ${updateTimeout}s: ${JSON.stringify(out)}`), (updateTimeout + 10) * 1000);

const bundles = client.FetchX509Bundles({}, md);
bundles.on('error', (e) => {
  if (e.code !== grpc.status.CANCELLED) fail('FetchX509Bundles: ' + e.message);
});
bundles.once('data', (resp) => {
  out.bundles = {};
  for (const [td, der] of Object.entries(resp.bundles)) out.bundles[td] = splitDer(der).map(fp).sort();
  bundles.cancel();
  const svids = client.FetchX509SVID({}, md);
  svids.on('error', (e) => {
    if (e.code !== grpc.status.CANCELLED) fail('FetchX509SVID: ' + e.message);
  });
  svids.on('data', (resp) => {
    const d = describe(resp.svids[0]);
    if (!out.svid) {
      out.svid = d;
    } else if (d.leaf !== out.svid.leaf) {
      out.renewed = d;
      svids.cancel();
      clearTimeout(timer);
      console.log(JSON.stringify(out));
      client.close();
    }
  });
});
