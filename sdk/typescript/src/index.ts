// ember-sandbox: the TypeScript SDK of ember, shaped like the Vercel Sandbox SDK.
//
//   import { Sandbox } from "ember-sandbox";
//   const sandbox = await Sandbox.create({ runtime: "node22", timeout: 60_000 });
//   const result = await sandbox.runCommand("node", ["-e", "console.log(44 * 44)"]);
//   console.log(await result.stdout()); // 1936
//   await sandbox.stop();

export { Sandbox, createBody, execBody, networkFromPolicy, msToSeconds } from "./sandbox.js";
export type {
  ForkOptions,
  NetworkPolicy,
  RunCommandParams,
  SandboxCreateOptions,
  SandboxSource,
  WriteFileEntry,
} from "./sandbox.js";
export { Command, CommandFinished, RESUMED_HEADER, resumedFrom, signalNumber } from "./command.js";
export type { CommandExitInfo, LogLine, ResumedHow, Signal, StreamName } from "./command.js";
export type { CommandInfo, GuestMetrics, HostMetrics, OnTimeout, SandboxMetrics, Suspension } from "./generated/api.js";
export { Snapshot } from "./snapshot.js";
export { health } from "./service.js";
export { Connection, connectionFor, resolveConnection } from "./connection.js";
export type { ConnectionOptions, ResolvedConnection } from "./connection.js";
export {
  AuthenticationError,
  BadRequestError,
  ConflictError,
  ConnectionError,
  EmberError,
  NotFoundError,
  ProtocolError,
  RateLimitError,
  ServerError,
} from "./errors.js";
export { NdjsonParser, parseNdjson } from "./ndjson.js";
export { OPERATIONS } from "./operations.js";
export type { Operation, OperationName } from "./operations.js";
export type * as api from "./generated/api.js";
