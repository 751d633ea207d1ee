import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { resolveConnection, ConnectionError, Sandbox, health } from "../../index.js";
import { FakeServer, sandboxInfo } from "./fake-server.js";

const PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

test("precedence: explicit url > explicit socket > EMBER_URL > EMBER_SOCKET", () => {
  const env = { EMBER_URL: "https://env.example:7443", EMBER_TOKEN: "env-token", EMBER_SOCKET: "/env.sock" };
  const a = resolveConnection({ url: "https://opt.example:1", token: "opt-token", socket: "/opt.sock" }, env);
  assert.equal(a.kind, "url");
  assert.equal(a.kind === "url" && a.url.host, "opt.example:1");
  assert.equal(a.kind === "url" && a.token, "opt-token");

  const b = resolveConnection({ socket: "/opt.sock" }, env);
  assert.deepEqual(b, { kind: "socket", socket: "/opt.sock" });

  const c = resolveConnection({}, env);
  assert.equal(c.kind, "url");
  assert.equal(c.kind === "url" && c.url.host, "env.example:7443");
  assert.equal(c.kind === "url" && c.token, "env-token");

  const d = resolveConnection({}, { EMBER_SOCKET: "/env.sock" });
  assert.deepEqual(d, { kind: "socket", socket: "/env.sock" });

  // An explicit token applies to EMBER_URL; empty variables count as unset.
  const e = resolveConnection({ token: "mine" }, { EMBER_URL: "https://h", EMBER_TOKEN: "", EMBER_SOCKET: "" });
  assert.equal(e.kind === "url" && e.token, "mine");

  const f = resolveConnection({ url: "https://h" }, {});
  assert.equal(f.kind === "url" && f.token, undefined);
});

test("nothing configured: a ConnectionError that says what to set", () => {
  assert.throws(
    () => resolveConnection({}, {}),
    (e: unknown) => e instanceof ConnectionError && e.code === "not_configured" && /EMBER_SOCKET/.test(e.message),
  );
  assert.throws(() => resolveConnection({ url: "ftp://x" }, {}), ConnectionError);
  assert.throws(() => resolveConnection({ url: "not a url" }, {}), ConnectionError);
});

test("CA: PEM text, a file path (option or EMBER_CA_FILE), or a missing file", () => {
  const dir = mkdtempSync(join(tmpdir(), "ember-ca-"));
  try {
    const file = join(dir, "ca.pem");
    writeFileSync(file, PEM);
    const text = resolveConnection({ url: "https://h", ca: PEM }, {});
    assert.equal(text.kind === "url" && text.ca?.toString(), PEM);
    const path = resolveConnection({ url: "https://h", ca: file }, {});
    assert.equal(path.kind === "url" && path.ca?.toString(), PEM);
    const env = resolveConnection({}, { EMBER_URL: "https://h", EMBER_CA_FILE: file });
    assert.equal(env.kind === "url" && env.ca?.toString(), PEM);
    const none = resolveConnection({}, { EMBER_URL: "https://h" });
    assert.equal(none.kind === "url" && none.ca, undefined);
    assert.throws(
      () => resolveConnection({ url: "https://h", ca: join(dir, "missing.pem") }, {}),
      (e: unknown) => e instanceof ConnectionError && e.code === "invalid_ca",
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a URL connection sends the bearer token on every request; a socket one sends none", async () => {
  const tcp = new FakeServer();
  const url = await tcp.listenTcp();
  tcp.on("GET", "/healthz", (req, res) => {
    if (req.headers["authorization"] !== "Bearer s3cret") FakeServer.error(res, 401, "unauthorized", "wrong token");
    else FakeServer.json(res, 200, { status: "ok", sandboxes: 0 });
  });
  tcp.on("GET", "/sandboxes/{id}", (_req, res, p) => FakeServer.json(res, 200, sandboxInfo(p["id"] as string)));
  const unix = new FakeServer();
  const socket = await unix.listenUnix();
  unix.on("GET", "/sandboxes/{id}", (_req, res, p) => FakeServer.json(res, 200, sandboxInfo(p["id"] as string)));
  try {
    assert.deepEqual(await health({ url, token: "s3cret" }), { status: "ok", sandboxes: 0 });
    await assert.rejects(health({ url, token: "wrong" }), (e: unknown) => (e as { status?: number }).status === 401);
    const sandbox = await Sandbox.get("sb", { url, token: "s3cret" });
    assert.equal(sandbox.sandboxId, "sb");
    assert.equal(tcp.requests.at(-1)?.headers["authorization"], "Bearer s3cret");
    await Sandbox.get("sb", { socket });
    assert.equal(unix.requests.at(-1)?.headers["authorization"], undefined);
  } finally {
    await tcp.close();
    await unix.close();
  }
});

test("a URL with a path prefix keeps it", async () => {
  const tcp = new FakeServer();
  const url = await tcp.listenTcp();
  tcp.on("GET", "/ember/sandboxes/{id}", (_req, res, p) => FakeServer.json(res, 200, sandboxInfo(p["id"] as string)));
  try {
    const sandbox = await Sandbox.get("a b", { url: `${url}/ember/`, token: "t" });
    assert.equal(sandbox.sandboxId, "a b");
    assert.equal(tcp.requests.at(-1)?.path, "/ember/sandboxes/a%20b");
  } finally {
    await tcp.close();
  }
});

test("EMBER_SOCKET from the environment is used when nothing is passed", async () => {
  const unix = new FakeServer();
  const socket = await unix.listenUnix();
  unix.on("GET", "/healthz", (_req, res) => FakeServer.json(res, 200, { status: "ok", sandboxes: 3 }));
  const saved = { url: process.env["EMBER_URL"], socket: process.env["EMBER_SOCKET"] };
  delete process.env["EMBER_URL"];
  process.env["EMBER_SOCKET"] = socket;
  try {
    assert.equal((await health()).sandboxes, 3);
  } finally {
    if (saved.url === undefined) delete process.env["EMBER_URL"];
    else process.env["EMBER_URL"] = saved.url;
    if (saved.socket === undefined) delete process.env["EMBER_SOCKET"];
    else process.env["EMBER_SOCKET"] = saved.socket;
    await unix.close();
  }
});
