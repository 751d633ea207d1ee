#!/usr/bin/env node
// Pays for `npm install` once: the first request boots a `node22` sandbox, installs the
// packages and runs the code; the sandbox is then snapshotted, and every later request is a
// sandbox restored from that snapshot (node_modules and all) that only runs the code.
// Prints, per request, the time taken and the time saved versus the first.
//
//   node snapshot-then-restore.mjs [requests=3] [package ...]     (default package: lodash)
//
// The service: EMBER_SOCKET (a Unix socket), or EMBER_URL + EMBER_TOKEN (+ EMBER_CA_FILE).
// Build the SDK first: (cd ../../sdk/typescript && npm install && npm run build).

import { Sandbox } from "../../sdk/typescript/dist/index.js";

const WORKDIR = "/home/user";

const [countArg, ...packageArgs] = process.argv.slice(2);
const requests = countArg === undefined ? 3 : Number.parseInt(countArg, 10);
if (!Number.isInteger(requests) || requests < 1) {
  console.error("usage: node snapshot-then-restore.mjs [requests=3] [package ...]");
  process.exit(2);
}
const packages = packageArgs.length > 0 ? packageArgs : ["lodash"];

/** The "generated" program of request `n`: loads each package and does a little work. */
function codeFor(n) {
  return [
    `const packages = ${JSON.stringify(packages)};`,
    "for (const name of packages) {",
    "  const mod = require(name);",
    "  console.log(`${name}: ${typeof mod}`);",
    "}",
    packages.includes("lodash") ? `console.log(JSON.stringify(require("lodash").chunk([...Array(${n + 3}).keys()], 2)));` : "",
    `console.log("request ${n} done");`,
  ].join("\n");
}

/** Writes and runs request `n`'s code; throws when it fails. */
async function answer(sandbox, n) {
  await sandbox.writeFiles([{ path: `${WORKDIR}/request.cjs`, content: codeFor(n) }]);
  const result = await sandbox.runCommand({ cmd: "node", args: ["request.cjs"], cwd: WORKDIR });
  if (result.exitCode !== 0) throw new Error(`request ${n} failed (${result.exitCode}): ${await result.stderr()}`);
  return (await result.stdout()).trim();
}

const ms = (start) => Math.round(performance.now() - start);
let snapshot;
const live = new Set();
try {
  // Request 1: boot, install, run.
  let start = performance.now();
  const first = await Sandbox.create({ runtime: "node22", timeout: 300_000, networkPolicy: "allow-all" });
  live.add(first);
  const install = await first.runCommand("npm", ["install", "--no-audit", "--no-fund", "--loglevel=error", ...packages]);
  if (install.exitCode !== 0) throw new Error(`npm install failed: ${await install.stderr()}`);
  const output = await answer(first, 1);
  const firstMs = ms(start);
  console.log(`request 1: ${firstMs} ms (boot + npm install ${packages.join(" ")} + run)`);
  console.log(indent(output));

  // Snapshot it once (stopping it): memory, disk and node_modules.
  start = performance.now();
  snapshot = await first.snapshot({ stop: true });
  console.log(`snapshot ${snapshot.snapshotId}: ${ms(start)} ms (once, not counted per request)`);
  await first.stop(); // stopped by the snapshot already: this forgets it
  live.delete(first);

  // Requests 2..N+1: a restore each, then only the code.
  for (let n = 2; n <= requests + 1; n++) {
    start = performance.now();
    const sandbox = await Sandbox.create({ source: { type: "snapshot", snapshotId: snapshot.snapshotId }, timeout: 60_000 });
    live.add(sandbox);
    try {
      const out = await answer(sandbox, n);
      const took = ms(start);
      console.log(`request ${n}: ${took} ms (restore + run), saved ${firstMs - took} ms vs the first`);
      console.log(indent(out));
    } finally {
      await sandbox.stop();
      live.delete(sandbox);
    }
  }
} catch (error) {
  console.error(`snapshot-then-restore: ${error.name}${error.code ? ` (${error.code})` : ""}: ${error.message}`);
  process.exitCode = 1;
} finally {
  for (const sandbox of live) await sandbox.stop().catch(() => undefined);
  if (snapshot) await snapshot.delete().catch((e) => console.error(`could not delete ${snapshot.snapshotId}: ${e.message}`));
}

function indent(text) {
  return text
    .split("\n")
    .map((line) => `    ${line}`)
    .join("\n");
}
