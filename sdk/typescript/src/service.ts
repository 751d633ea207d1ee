// The service itself.

import { connectionFor, type ConnectionOptions } from "./connection.js";
import type { Health } from "./generated/api.js";

/** `GET /healthz`: the service answers (`status: "ok"`) and how many sandboxes it knows. */
export async function health(options: ConnectionOptions & { signal?: AbortSignal } = {}): Promise<Health> {
  return connectionFor(options).json<Health>("health", { signal: options.signal });
}
