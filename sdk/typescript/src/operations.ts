// Every API operation the SDK calls, in one table: name -> method + path template. All
// requests go through it (see Connection.request), and the unit test `spec.test.ts` checks
// each entry against api/openapi.json: the path exists with that method, and the request
// schema named here is the one the document gives.

import type { SchemaName } from "./generated/api.js";

export type HttpMethod = "GET" | "POST" | "PUT" | "PATCH" | "DELETE";

export interface Operation {
  readonly method: HttpMethod;
  /** The path template, with `{param}` placeholders as in the API document. */
  readonly path: string;
  /** The JSON request body's schema, when the operation takes one. */
  readonly body?: SchemaName;
  /** The query parameters the SDK may send. */
  readonly query?: readonly string[];
  /** The body is raw bytes (`application/octet-stream`), not JSON. */
  readonly rawBody?: true;
}

export const OPERATIONS = {
  health: { method: "GET", path: "/healthz" },
  createSandbox: { method: "POST", path: "/sandboxes", body: "CreateBody" },
  listSandboxes: { method: "GET", path: "/sandboxes" },
  getSandbox: { method: "GET", path: "/sandboxes/{id}" },
  stopSandbox: { method: "DELETE", path: "/sandboxes/{id}" },
  setTimeout: { method: "POST", path: "/sandboxes/{id}/timeout", body: "TimeoutBody" },
  updateNetworkPolicy: { method: "PATCH", path: "/sandboxes/{id}/network", body: "NetworkPolicy" },
  exec: { method: "POST", path: "/sandboxes/{id}/exec", body: "ExecBody" },
  sandboxMetrics: { method: "GET", path: "/sandboxes/{id}/metrics" },
  listCommands: { method: "GET", path: "/sandboxes/{id}/commands" },
  getCommand: { method: "GET", path: "/sandboxes/{id}/commands/{cid}" },
  commandLogs: { method: "GET", path: "/sandboxes/{id}/commands/{cid}/logs" },
  killCommand: { method: "POST", path: "/sandboxes/{id}/commands/{cid}/kill", body: "KillBody" },
  writeFile: { method: "PUT", path: "/sandboxes/{id}/files", query: ["path", "mode"], rawBody: true },
  readFile: { method: "GET", path: "/sandboxes/{id}/files", query: ["path"] },
  mkdir: { method: "POST", path: "/sandboxes/{id}/files/mkdir", body: "MkdirBody" },
  createSnapshot: { method: "POST", path: "/sandboxes/{id}/snapshots", body: "SnapshotBody" },
  getSnapshot: { method: "GET", path: "/snapshots/{id}" },
  deleteSnapshot: { method: "DELETE", path: "/snapshots/{id}" },
  forkSnapshot: { method: "POST", path: "/snapshots/{id}/fork", body: "ForkBody" },
} as const satisfies Record<string, Operation>;

export type OperationName = keyof typeof OPERATIONS;

/** The names of the `{placeholders}` in a path template. */
export function pathParams(template: string): string[] {
  return [...template.matchAll(/\{([^}]+)\}/g)].map((m) => m[1] as string);
}

/** The path of `op` with its placeholders filled in (each value URL-encoded). */
export function buildPath(op: Operation, params: Record<string, string> = {}): string {
  return op.path.replace(/\{([^}]+)\}/g, (_, name: string) => {
    const value = params[name];
    if (value === undefined) throw new TypeError(`${op.method} ${op.path}: missing path parameter ${name}`);
    return encodeURIComponent(value);
  });
}
