// A tiny fake of the ember service on a temporary Unix socket (or TCP port), for unit tests:
// routes by method and path, records every request.

import * as http from "node:http";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { AddressInfo } from "node:net";

export interface RecordedRequest {
  method: string;
  path: string;
  query: URLSearchParams;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
  /** The body as JSON, when it is. */
  json: unknown;
}

export type Handler = (req: RecordedRequest, res: http.ServerResponse, params: Record<string, string>) => void | Promise<void>;

interface Route {
  method: string;
  pattern: RegExp;
  names: string[];
  handler: Handler;
}

export class FakeServer {
  readonly requests: RecordedRequest[] = [];
  private readonly routes: Route[] = [];
  private readonly server: http.Server;
  private dir: string | undefined;
  socketPath = "";
  port = 0;

  constructor() {
    this.server = http.createServer((req, res) => void this.handle(req, res));
  }

  /** Adds a route: `path` may hold `{param}` placeholders. Later routes win. */
  on(method: string, path: string, handler: Handler): this {
    const names: string[] = [];
    const pattern = new RegExp(
      "^" +
        path.replace(/[.*+?^$()|[\]\\]/g, "\\$&").replace(/\\?\{([^}]+)\\?\}/g, (_, name: string) => {
          names.push(name);
          return "([^/]+)";
        }) +
        "$",
    );
    this.routes.unshift({ method, pattern, names, handler });
    return this;
  }

  /** Answers `status` with a JSON body. */
  static json(res: http.ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
    const text = body === undefined ? "" : JSON.stringify(body);
    res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text), ...headers });
    res.end(text);
  }

  /** Answers an API error document. */
  static error(res: http.ServerResponse, status: number, code: string, message: string, headers: Record<string, string> = {}): void {
    FakeServer.json(res, status, { error: { code, message } }, headers);
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const chunk of req) chunks.push(chunk as Buffer);
    const body = Buffer.concat(chunks);
    const url = new URL(req.url ?? "/", "http://fake");
    let json: unknown;
    if ((req.headers["content-type"] ?? "").includes("json") && body.length > 0) {
      try {
        json = JSON.parse(body.toString("utf8"));
      } catch {
        json = undefined;
      }
    }
    const recorded: RecordedRequest = {
      method: req.method ?? "GET",
      path: url.pathname,
      query: url.searchParams,
      headers: req.headers,
      body,
      json,
    };
    this.requests.push(recorded);
    for (const route of this.routes) {
      if (route.method !== recorded.method) continue;
      const match = route.pattern.exec(recorded.path);
      if (!match) continue;
      const params: Record<string, string> = {};
      route.names.forEach((name, i) => (params[name] = decodeURIComponent(match[i + 1] as string)));
      try {
        await route.handler(recorded, res, params);
      } catch (error) {
        if (!res.headersSent) FakeServer.error(res, 500, "fake_failed", String(error));
        else res.destroy();
      }
      return;
    }
    FakeServer.error(res, 404, "not_found", "no such endpoint");
  }

  /** Listens on a fresh Unix socket in a temporary directory. */
  async listenUnix(): Promise<string> {
    this.dir = mkdtempSync(join(tmpdir(), "ember-sdk-test-"));
    this.socketPath = join(this.dir, "api.sock");
    await new Promise<void>((resolve) => this.server.listen(this.socketPath, resolve));
    return this.socketPath;
  }

  /** Listens on 127.0.0.1 (for URL + token tests). */
  async listenTcp(): Promise<string> {
    await new Promise<void>((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.port = (this.server.address() as AddressInfo).port;
    return `http://127.0.0.1:${this.port}`;
  }

  async close(): Promise<void> {
    this.server.closeAllConnections?.();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    if (this.dir) rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A SandboxInfo for fakes. */
export function sandboxInfo(id: string, overrides: Record<string, unknown> = {}): Record<string, unknown> {
  const now = Date.now();
  return {
    id,
    state: "running",
    created_unix_ms: now,
    vcpus: 1,
    memory_mib: 256,
    timeout_at_unix_ms: now + 300_000,
    timeline: [],
    env: {},
    disk_limits: {},
    net_limits: {},
    network: { mode: "none" },
    ports: [],
    runtime: "base",
    on_timeout: "stop",
    auto_resume: true,
    ...overrides,
  };
}

/** A SandboxMetrics for fakes. */
export function sandboxMetrics(id: string, overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    id,
    state: "running",
    sampled_unix_ms: Date.now(),
    guest: {
      cpus: 2,
      cpu_user_ms: 120,
      cpu_system_ms: 30,
      cpu_idle_ms: 5000,
      cpu_iowait_ms: 1,
      load_1m: 0.1,
      load_5m: 0.05,
      load_15m: 0.01,
      memory_total_bytes: 256 << 20,
      memory_available_bytes: 200 << 20,
      memory_used_bytes: 56 << 20,
      processes: 7,
      uptime_s: 12,
    },
    host: { vmm_pid: 4242, rss_bytes: 64 << 20, cpu_usage_us: 150_000, cgroup_memory_bytes: 70 << 20 },
    ...overrides,
  };
}

/** Writes NDJSON records, each line optionally cut into pieces sent apart. */
export async function writeNdjson(
  res: http.ServerResponse,
  records: unknown[],
  options: { splitEvery?: number; delayMs?: number } = {},
): Promise<void> {
  if (!res.headersSent) res.writeHead(200, { "content-type": "application/x-ndjson" });
  const text = Buffer.from(records.map((r) => JSON.stringify(r) + "\n").join(""), "utf8");
  const step = options.splitEvery ?? text.length;
  for (let i = 0; i < text.length; i += step) {
    res.write(text.subarray(i, i + step));
    if (options.delayMs) await new Promise((r) => setTimeout(r, options.delayMs));
  }
}
