// Snapshots: a sandbox saved in the service's store, to create sandboxes from.

import { connectionFor, type Connection, type ConnectionOptions } from "./connection.js";
import type { SnapshotInfo } from "./generated/api.js";
import { forkSnapshot, type ForkOptions, type Sandbox } from "./sandbox.js";

/** A snapshot in the service's store (`Sandbox.create({source: {type: "snapshot", snapshotId}})`). */
export class Snapshot {
  /** The snapshot as the service described it last. */
  info: SnapshotInfo;
  /** How long taking it took, in ms (snapshots returned by `sandbox.snapshot()` only). */
  readonly tookMs: number | undefined;
  /** @internal */
  readonly connection: Connection;

  /** @internal Use `sandbox.snapshot()` or `Snapshot.get()`. */
  constructor(connection: Connection, info: SnapshotInfo, tookMs?: number | null) {
    this.connection = connection;
    this.info = info;
    this.tookMs = tookMs ?? undefined;
  }

  get snapshotId(): string {
    return this.info.id;
  }

  /** When it was taken. */
  get createdAt(): Date {
    return new Date(this.info.created_unix_ms);
  }

  /** The guest's memory size, in MiB. */
  get memoryMib(): number {
    return this.info.memory_mib;
  }

  /** A snapshot by id. Throws NotFoundError when there is none. */
  static async get(params: { snapshotId: string } & ConnectionOptions): Promise<Snapshot> {
    const connection = connectionFor(params);
    const info = await connection.json<SnapshotInfo>("getSnapshot", { params: { id: params.snapshotId } });
    return new Snapshot(connection, info);
  }

  /** Reads the snapshot's description again. */
  async refresh(): Promise<SnapshotInfo> {
    this.info = await this.connection.json<SnapshotInfo>("getSnapshot", { params: { id: this.snapshotId } });
    return this.info;
  }

  /** `count` sandboxes restored from it at once, running. */
  async fork(count: number, options: ForkOptions = {}): Promise<Sandbox[]> {
    return forkSnapshot(this.connection, this.snapshotId, count, options);
  }

  /** Deletes it (refused with a ConflictError while live sandboxes restored from it run). */
  async delete(): Promise<void> {
    await this.connection.json("deleteSnapshot", { params: { id: this.snapshotId } });
  }
}
