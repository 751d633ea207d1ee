// Typed errors: every non-2xx answer of the API is `{"error": {"code", "message"}}` and becomes
// one of these classes, picked by HTTP status.

import type { ErrorDocument } from "./generated/api.js";

/** Any failure the SDK reports: `code` is the API's machine-readable code. */
export class EmberError extends Error {
  /** The API's error code (`not_found`, `conflict`, ...), or an SDK one (`connection_failed`). */
  readonly code: string;
  /** The HTTP status, when the service answered. */
  readonly status: number | undefined;

  constructor(message: string, options: { code: string; status?: number | undefined; cause?: unknown }) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = options.code;
    this.status = options.status;
  }
}

/** 400, 413, 422: the request was malformed, too large or invalid. */
export class BadRequestError extends EmberError {}

/** 401: a missing or wrong token (remote access). */
export class AuthenticationError extends EmberError {}

/** 404: no such sandbox, command, file, snapshot or endpoint. */
export class NotFoundError extends EmberError {}

/** 409: the sandbox is not running, the command has finished, the name is taken, ... */
export class ConflictError extends EmberError {}

/** 429: rate limited, or the service runs as many sandboxes as it may. */
export class RateLimitError extends EmberError {
  /** Seconds to wait before trying again (the `Retry-After` header), when given. */
  readonly retryAfter: number | undefined;

  constructor(
    message: string,
    options: { code: string; status?: number | undefined; retryAfter?: number | undefined; cause?: unknown },
  ) {
    super(message, options);
    this.retryAfter = options.retryAfter;
  }
}

/** 5xx: the service, the guest or the VMM failed. */
export class ServerError extends EmberError {}

/** The service could not be reached (no socket, refused, TLS failure, connection lost). */
export class ConnectionError extends EmberError {
  constructor(message: string, options: { cause?: unknown; code?: string } = {}) {
    super(message, { code: options.code ?? "connection_failed", cause: options.cause });
  }
}

/** The answer broke the protocol (an NDJSON line that is not JSON, a stream cut short). */
export class ProtocolError extends EmberError {
  constructor(message: string, options: { code?: string; cause?: unknown } = {}) {
    super(message, { code: options.code ?? "protocol_error", cause: options.cause });
  }
}

/** Seconds from a `Retry-After` header: delta-seconds or an HTTP date. */
export function parseRetryAfter(value: string | string[] | undefined, now: number = Date.now()): number | undefined {
  const text = Array.isArray(value) ? value[0] : value;
  if (text === undefined || text.trim() === "") return undefined;
  if (/^\s*\d+(\.\d+)?\s*$/.test(text)) return Number(text);
  const date = Date.parse(text);
  if (Number.isNaN(date)) return undefined;
  return Math.max(0, Math.ceil((date - now) / 1000));
}

/** The error for an answer with `status` and `body` (the raw bytes of an error document). */
export function errorFromResponse(
  status: number,
  body: string,
  headers: Record<string, string | string[] | undefined> = {},
): EmberError {
  let code = `http_${status}`;
  let message = body.trim() || `HTTP ${status}`;
  try {
    const doc = JSON.parse(body) as Partial<ErrorDocument>;
    if (doc && typeof doc === "object" && doc.error && typeof doc.error.code === "string") {
      code = doc.error.code;
      message = typeof doc.error.message === "string" ? doc.error.message : message;
    }
  } catch {
    // Not an error document (a proxy's page, say): keep the text.
  }
  const options = { code, status };
  if (status === 401) return new AuthenticationError(message, options);
  if (status === 404) return new NotFoundError(message, options);
  if (status === 409) return new ConflictError(message, options);
  if (status === 429) {
    return new RateLimitError(message, { ...options, retryAfter: parseRetryAfter(headers["retry-after"]) });
  }
  if (status === 400 || status === 413 || status === 422) return new BadRequestError(message, options);
  if (status >= 500) return new ServerError(message, options);
  return new EmberError(message, options);
}
