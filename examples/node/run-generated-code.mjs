#!/usr/bin/env node
// Runs "generated" JavaScript (say, an AI agent's tool call) in a fresh ember sandbox:
// a `node22` sandbox with a 30 s timeout, network only when packages must be installed,
// `npm install` of the packages, then `node` on the code. Prints {stdout, stderr, exitCode}
// as JSON and always stops the sandbox.
//
//   node run-generated-code.mjs code.js [package ...]       code from a file
//   node run-generated-code.mjs - lodash < code.js           code from stdin
//   echo '{"code": "console.log(1)", "packages": []}' | node run-generated-code.mjs
//                                                            a tool call {code, packages} on stdin
//
// The service: EMBER_SOCKET (a Unix socket), or EMBER_URL + EMBER_TOKEN (+ EMBER_CA_FILE).
// Build the SDK first: (cd ../../sdk/typescript && npm install && npm run build).

import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

import { Sandbox } from "../../sdk/typescript/dist/index.js";

const WORKDIR = "/home/user"; // node22 runs commands as `user` here

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

/** {code, packages} from argv (a file or `-` for stdin, then packages) or a JSON tool call on stdin. */
async function readRequest(argv) {
  const [source, ...packages] = argv;
  if (source !== undefined && source !== "-") return { code: readFileSync(source, "utf8"), packages };
  const text = await readStdin();
  if (source === undefined) {
    try {
      const call = JSON.parse(text);
      if (call && typeof call.code === "string") {
        return { code: call.code, packages: Array.isArray(call.packages) ? call.packages.map(String) : [] };
      }
    } catch {
      // Not JSON: the code itself.
    }
  }
  return { code: text, packages };
}

/** ESM when the code imports or exports, else CommonJS. */
function fileNameFor(code) {
  return /^\s*(import\s|import\(|export\s)/m.test(code) ? "main.mjs" : "main.cjs";
}

export async function runGeneratedCode({ code, packages = [] }) {
  const sandbox = await Sandbox.create({
    runtime: "node22",
    timeout: 30_000,
    ...(packages.length > 0 ? { networkPolicy: "allow-all" } : {}),
  });
  try {
    if (packages.length > 0) {
      const install = await sandbox.runCommand("npm", ["install", "--no-audit", "--no-fund", "--loglevel=error", ...packages]);
      if (install.exitCode !== 0) {
        return {
          stdout: await install.stdout(),
          stderr: `npm install failed:\n${await install.stderr()}`,
          exitCode: install.exitCode,
        };
      }
    }
    const file = fileNameFor(code);
    await sandbox.writeFiles([{ path: `${WORKDIR}/${file}`, content: code }]);
    const result = await sandbox.runCommand({ cmd: "node", args: [file], cwd: WORKDIR, timeout: 20_000 });
    return {
      stdout: await result.stdout(),
      stderr: await result.stderr(),
      exitCode: result.exitCode,
      ...(result.signal !== null ? { signal: result.signal } : {}),
      ...(result.timedOut ? { timedOut: true } : {}),
    };
  } finally {
    await sandbox.stop();
  }
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  try {
    const request = await readRequest(process.argv.slice(2));
    console.log(JSON.stringify(await runGeneratedCode(request)));
  } catch (error) {
    console.error(`run-generated-code: ${error.name}${error.code ? ` (${error.code})` : ""}: ${error.message}`);
    process.exitCode = 1;
  }
}
