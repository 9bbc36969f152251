import type { components } from "./generated/openapi.js";
import type { Statehouse } from "./client.js";
import { StatehouseStorage } from "./storage.js";
import { Blobs } from "./blobs.js";
import { base64ToBytes, bytesToBase64, isJsonContentType } from "./values.js";

type Schemas = components["schemas"];
export type ObjectInfo = Schemas["ObjectBody"];
export type DeleteAllResult = Schemas["DeleteAllBody"];
export type BatchOp = Schemas["BatchOp"];
export type EventIn = Schemas["EventIn"];
export type ListedKey = Schemas["ListedKey"];
export type ListKeysPage = Schemas["ListKeysBody"];
export type HistoryPage = Schemas["HistoryBody"];
export type RestoreResult = Schemas["RestoreBody"];
/** A point of an object's history: just after a version, or the newest version committed at or before an instant. */
export type HistoryPoint = { version: number } | { at: Date | string };

/**
 * One op's answer in a batch: the document's `BatchResult`, narrowed so that a
 * `get` that found its key has its version, content type and value.
 */
export type BatchResult =
  | { op: "put"; key: string; version: number }
  | { op: "delete"; key: string; deleted: boolean }
  | { op: "get"; key: string; found: false }
  | { op: "get"; key: string; found: true; version: number; content_type: string; value: unknown; encoding?: string };

/** The batch answer: the document's `BatchBody`, with the narrowed results. */
export type BatchResponse = Omit<Schemas["BatchBody"], "results"> & { results: BatchResult[] };

export type EventsRecorded = Schemas["EventsRecorded"];

/** The most ops one batch carries (the server's limit, as for Durable Objects' multi-key calls). */
export const MAX_BATCH_OPS = 128;
/** The most events one call carries. */
export const MAX_EVENTS = 1000;
/** Keys are 1-2048 bytes of UTF-8. */
export const MAX_KEY_BYTES = 2048;

/** A key's stored bytes, content type and version (the version at which it was last written). */
export interface RawEntry {
  bytes: Uint8Array;
  contentType: string;
  version: number;
}

export interface Conditions {
  /** Apply only if the key's version is this one. */
  ifMatch?: number;
  /** `"*"`: apply only if the key does not exist. */
  ifNoneMatch?: "*";
}

/**
 * One object (namespace + id). `storage` is the Durable Objects storage API;
 * the other members are the rest of what the server offers for an object.
 */
export class StatehouseObject {
  readonly storage: StatehouseStorage;
  readonly blobs: Blobs;
  readonly path: string;

  constructor(
    readonly client: Statehouse,
    readonly ns: string,
    readonly id: string,
  ) {
    this.path = `/v1/objects/${encodeURIComponent(ns)}/${encodeURIComponent(id)}`;
    this.storage = new StatehouseStorage(this);
    this.blobs = new Blobs(this);
  }

  /** Version, key count, bytes, fence and lease; null for an object never written. */
  async info(): Promise<ObjectInfo | null> {
    const { response } = await this.client.request({ method: "GET", path: this.path, accept: [404] });
    if (response.status === 404) {
      await response.body?.cancel();
      return null;
    }
    return (await response.json()) as ObjectInfo;
  }

  /** Deletes every key and blob; the version bumps. */
  async deleteAll(): Promise<DeleteAllResult> {
    const { response } = await this.client.request({ method: "DELETE", path: this.path });
    return (await response.json()) as DeleteAllResult;
  }

  /** The object's versions, newest first, with what each changed (unexported changes included). */
  async history(options: { limit?: number; cursor?: string } = {}): Promise<HistoryPage> {
    const { response } = await this.client.request({
      method: "GET",
      path: `${this.path}/history`,
      query: { limit: options.limit, cursor: options.cursor },
    });
    return (await response.json()) as HistoryPage;
  }

  /**
   * Restores the object to a point of its history, or with `into` forks that
   * state into another object of the namespace (which must be empty unless
   * `overwrite`). One write, a new version. Retried only with `ifMatch`, which
   * keeps a repeat from applying twice.
   */
  async restore(
    point: HistoryPoint,
    options: { into?: string; overwrite?: boolean; ifMatch?: number } = {},
  ): Promise<RestoreResult> {
    const at = "at" in point ? (point.at instanceof Date ? point.at.toISOString() : point.at) : undefined;
    const json = {
      ...("version" in point ? { version: point.version } : { at }),
      ...(options.into === undefined ? {} : { into: options.into }),
      ...(options.overwrite ? { overwrite: true } : {}),
    };
    const { response } = await this.client.request({
      method: "POST",
      path: `${this.path}/restore`,
      json,
      headers: conditionHeaders({ ifMatch: options.ifMatch }),
      retry: options.ifMatch === undefined ? "never" : "idempotent",
    });
    return (await response.json()) as RestoreResult;
  }

  /** Records one application event; it lands in the `statehouse.events` Iceberg table. */
  async emit(type: string, data?: unknown, options: { ts?: Date | string } = {}): Promise<{ version: number; eventId: string }> {
    const recorded = await this.emitMany([{ type, data, ts: options.ts }]);
    return { version: recorded.version, eventId: recorded.event_ids[0]! };
  }

  /** Records up to 1000 events atomically. Not retried: a repeat would record them twice. */
  async emitMany(events: { type: string; data?: unknown; ts?: Date | string | undefined }[]): Promise<EventsRecorded> {
    if (events.length === 0 || events.length > MAX_EVENTS) {
      throw new RangeError(`emitMany takes 1 to ${MAX_EVENTS} events, got ${events.length}`);
    }
    const { response } = await this.client.request({
      method: "POST",
      path: `${this.path}/events`,
      json: { events: events.map(toEventIn) },
      retry: "never",
    });
    return (await response.json()) as EventsRecorded;
  }

  /**
   * An atomic batch: all ops (and events) or none, one version bump. Retried
   * on 503/429/fenced only when it cannot do anything twice: no events, and
   * every op a get, a fixed put or delete, or conditional.
   */
  async batch(ops: BatchOp[], options: { events?: { type: string; data?: unknown; ts?: Date | string }[]; outcome?: { ambiguous: boolean; attempts: number } } = {}): Promise<BatchResponse> {
    if (ops.length > MAX_BATCH_OPS) {
      throw new RangeError(`a batch holds at most ${MAX_BATCH_OPS} ops (the server's limit), this one has ${ops.length}`);
    }
    const events = options.events?.map(toEventIn) ?? [];
    const { response } = await this.client.request({
      method: "POST",
      path: `${this.path}/batch`,
      json: events.length > 0 ? { ops, events } : { ops },
      retry: events.length === 0 ? "idempotent" : "never",
      outcome: options.outcome,
    });
    return (await response.json()) as BatchResponse;
  }

  /** A key's raw bytes, content type and version; null when absent. */
  async getRaw(key: string): Promise<RawEntry | null> {
    checkKey(key);
    if (!pathSafe(key)) {
      const [result] = (await this.batch([{ op: "get", key }])).results;
      if (!result || result.op !== "get" || !result.found) return null;
      return { bytes: embeddedBytes(result.value, result.encoding, result.content_type), contentType: result.content_type, version: result.version };
    }
    const { response } = await this.client.request({ method: "GET", path: this.keyPath(key), accept: [404] });
    if (response.status === 404) {
      await response.body?.cancel();
      return null;
    }
    const bytes = new Uint8Array(await response.arrayBuffer());
    return {
      bytes,
      contentType: response.headers.get("content-type") ?? "application/octet-stream",
      version: parseEtag(response.headers.get("etag")),
    };
  }

  /** Stores bytes under a key with a content type; answers the object's new version. */
  async putRaw(key: string, bytes: Uint8Array, contentType: string, conditions: Conditions = {}): Promise<number> {
    checkKey(key);
    if (!pathSafe(key)) {
      const op: BatchOp = { op: "put", key, value_base64: bytesToBase64(bytes), content_type: contentType };
      if (conditions.ifMatch !== undefined) op.if_version = conditions.ifMatch;
      if (conditions.ifNoneMatch === "*") op.if_absent = true;
      return (await this.batch([op])).version;
    }
    const { response } = await this.client.request({
      method: "PUT",
      path: this.keyPath(key),
      body: bytes,
      headers: { "content-type": contentType, ...conditionHeaders(conditions) },
    });
    return ((await response.json()) as Schemas["VersionBody"]).version;
  }

  /** Deletes a key; `deleted` is false when it did not exist. */
  async deleteRaw(key: string, conditions: Pick<Conditions, "ifMatch"> = {}): Promise<{ deleted: boolean; version: number }> {
    checkKey(key);
    if (!pathSafe(key)) {
      const op: BatchOp = { op: "delete", key };
      if (conditions.ifMatch !== undefined) op.if_version = conditions.ifMatch;
      const answer = await this.batch([op]);
      const result = answer.results[0];
      return { deleted: result?.op === "delete" && result.deleted, version: answer.version };
    }
    const { response } = await this.client.request({ method: "DELETE", path: this.keyPath(key), headers: conditionHeaders(conditions) });
    return (await response.json()) as Schemas["DeletedBody"];
  }

  /** One page of keys in byte order (the server's listing, as it answers). */
  async listPage(options: { prefix?: string; start?: string; end?: string; limit?: number; reverse?: boolean; cursor?: string; values?: boolean } = {}): Promise<ListKeysPage> {
    const { response } = await this.client.request({
      method: "GET",
      path: `${this.path}/kv`,
      query: {
        prefix: options.prefix,
        start: options.start,
        end: options.end,
        limit: options.limit,
        reverse: options.reverse ? true : undefined,
        cursor: options.cursor,
        values: options.values === false ? false : undefined,
      },
    });
    return (await response.json()) as ListKeysPage;
  }

  private keyPath(key: string): string {
    return `${this.path}/kv/${encodeURIComponent(key)}`;
  }
}

function toEventIn(event: { type: string; data?: unknown; ts?: Date | string | undefined }): EventIn {
  const out: EventIn = { type: event.type };
  if (event.data !== undefined) out.data = event.data;
  if (event.ts !== undefined) out.ts = event.ts instanceof Date ? event.ts.toISOString() : event.ts;
  return out;
}

export function checkKey(key: unknown): asserts key is string {
  if (typeof key !== "string") throw new TypeError(`keys are strings, got ${typeof key}`);
  let bytes: number;
  try {
    bytes = new TextEncoder().encode(key).length;
    encodeURIComponent(key);
  } catch {
    throw new TypeError(`key ${JSON.stringify(key)} has an unpaired surrogate: keys are UTF-8`);
  }
  if (bytes === 0 || bytes > MAX_KEY_BYTES) {
    throw new RangeError(`keys are 1 to ${MAX_KEY_BYTES} bytes of UTF-8, this one is ${bytes}`);
  }
}

/**
 * Whether the key survives as a URL path segment. URL parsers resolve `.` and
 * `..` segments (also written %2E), so those keys go through the batch route,
 * which carries the key in JSON.
 */
function pathSafe(key: string): boolean {
  return key !== "." && key !== "..";
}

export function parseEtag(etag: string | null): number {
  const match = etag?.match(/^(?:W\/)?"(\d+)"$/);
  if (!match) throw new TypeError(`the server sent no version ETag (got ${JSON.stringify(etag)})`);
  return Number(match[1]);
}

function conditionHeaders(conditions: Conditions): Record<string, string | undefined> {
  return {
    "if-match": conditions.ifMatch === undefined ? undefined : `"${conditions.ifMatch}"`,
    "if-none-match": conditions.ifNoneMatch,
  };
}

function embeddedBytes(value: unknown, encoding: string | undefined, contentType: string): Uint8Array {
  if (encoding === "base64") return base64ToBytes(String(value));
  return new TextEncoder().encode(isJsonContentType(contentType) ? JSON.stringify(value) : String(value));
}
