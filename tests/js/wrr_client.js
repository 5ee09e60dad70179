// A stock @grpc/grpc-js client balancing with weighted_round_robin over ORCA.
//
//   node wrr_client.js TARGET METHOD WARMUP_MS CALLS CONCURRENCY
//
// TARGET lists the servers, e.g. ipv4:127.0.0.1:5001,127.0.0.1:5002. METHOD is
// a unary method taking an empty request (e.g. /loadsvc.v1.LoadService/GetLoads).
// The client calls METHOD while warming up (connections, ORCA streams, first
// weights): until a line arrives on stdin, or WARMUP_MS passes. Then it makes
// CALLS more calls, CONCURRENCY at a time, and prints one JSON line:
// {"peers": {"127.0.0.1:5001": n, ...}, "errors": n, "warmup_calls": n}.
// Nothing here knows about loadsvc: it is what any grpc-js application does.
'use strict';

const grpc = require('@grpc/grpc-js');

const [target, method, warmupMs, calls, concurrency] = process.argv.slice(2);
if (!concurrency) {
  console.error('usage: node wrr_client.js TARGET METHOD WARMUP_MS CALLS CONCURRENCY');
  process.exit(2);
}

// One config for both stacks: grpc-js reads the snake_case keys, C-core the
// camelCase ones, and each ignores the keys it does not know.
const period = '0.1s';
const serviceConfig = {
  loadBalancingConfig: [{
    weighted_round_robin: {
      enable_oob_load_report: true,
      oob_load_reporting_period: period,
      blackout_period: '0s',
      weight_update_period: period,
      enableOobLoadReport: true,
      oobReportingPeriod: period,
      blackoutPeriod: '0s',
      weightUpdatePeriod: period,
    },
  }],
};

const client = new grpc.Client(target, grpc.credentials.createInsecure(), {
  'grpc.service_config': JSON.stringify(serviceConfig),
});
const identity = (b) => b;
const empty = Buffer.alloc(0);

function call() {
  return new Promise((resolve) => {
    let c = null;
    const deadline = new Date(Date.now() + 5000);
    c = client.makeUnaryRequest(method, identity, identity, empty, { deadline }, (err) => {
      resolve({ err, peer: c.getPeer() });
    });
  });
}

async function main() {
  const peers = {};
  let errors = 0;
  let warmupCalls = 0;
  const lastErrors = [];
  const warmupEnd = Date.now() + Number(warmupMs);
  let go = false;
  process.stdin.once('data', () => { go = true; });
  process.stdin.on('error', () => {});
  while (!go && Date.now() < warmupEnd) {
    const { err } = await call();
    warmupCalls += 1;
    if (err) {
      lastErrors.push(String(err.message));
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  let remaining = Number(calls);
  async function worker() {
    while (remaining > 0) {
      remaining -= 1;
      const { err, peer } = await call();
      if (err) {
        errors += 1;
        lastErrors.push(String(err.message));
      } else {
        peers[peer] = (peers[peer] || 0) + 1;
      }
    }
  }
  await Promise.all(Array.from({ length: Number(concurrency) }, worker));
  console.log(JSON.stringify({ peers, errors, warmup_calls: warmupCalls,
                               last_errors: lastErrors.slice(-3) }));
  client.close();
  process.stdin.destroy();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
