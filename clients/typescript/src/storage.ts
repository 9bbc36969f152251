import type { BatchOp, BatchResult, ListedKey, StatehouseObject } from "./object.js";
import { MAX_BATCH_OPS, checkKey } from "./object.js";
import { CommitOutcomeUnknownError, StatehouseError, TransactionConflictError } from "./errors.js";
import {
  type EncodedValue,
  bytesToBase64,
  compareKeys,
  decodeBytes,
  decodeEmbedded,
  embeddedToWire,
  encodeValue,
  utf8Length,
} from "./values.js";

/**
 * Durable Objects' options. Accepted so that code written for them runs
 * unchanged; they change nothing here: there is no client cache to bypass,
 * and every write is acknowledged only once durable.
 */
export interface StorageGetOptions {
  allowConcurrency?: boolean;
  noCache?: boolean;
}
export interface StoragePutOptions {
  allowConcurrency?: boolean;
  allowUnconfirmed?: boolean;
  noCache?: boolean;
}
export interface StorageListOptions extends StorageGetOptions {
  /** First key (inclusive). */
  start?: string;
  /** Keys after this one (exclusive); not with `start`. */
  startAfter?: string;
  /** Last key (exclusive). */
  end?: string;
  prefix?: string;
  /** Descending order; `limit` then counts from the end. */
  reverse?: boolean;
  limit?: number;
}
export interface TransactionOptions {
  /** Attempts before giving up with TransactionConflictError. Default 10. */
  maxAttempts?: number;
}

/** What `storage` and a transaction's `txn` have in common: the Durable Objects key-value calls. */
export interface StorageOperations {
  get<T = unknown>(key: string, options?: StorageGetOptions): Promise<T | undefined>;
  get<T = unknown>(keys: string[], options?: StorageGetOptions): Promise<Map<string, T>>;
  put<T>(key: string, value: T, options?: StoragePutOptions): Promise<void>;
  put<T>(entries: Record<string, T>, options?: StoragePutOptions): Promise<void>;
  delete(key: string, options?: StoragePutOptions): Promise<boolean>;
  delete(keys: string[], options?: StoragePutOptions): Promise<number>;
  list<T = unknown>(options?: StorageListOptions): Promise<Map<string, T>>;
}

/**
 * The Durable Objects `DurableObjectStorage` API for one Statehouse object.
 * Every call is one HTTP request; multi-key calls are one atomic batch.
 * Alarms (getAlarm/setAlarm/deleteAlarm) are absent: the server has none yet.
 */
export class StatehouseStorage implements StorageOperations {
  constructor(readonly object: StatehouseObject) {}

  get<T = unknown>(key: string, options?: StorageGetOptions): Promise<T | undefined>;
  get<T = unknown>(keys: string[], options?: StorageGetOptions): Promise<Map<string, T>>;
  async get<T>(keyOrKeys: string | string[], _options?: StorageGetOptions): Promise<T | undefined | Map<string, T>> {
    if (Array.isArray(keyOrKeys)) {
      const found = await readMany(this.object, keyOrKeys);
      const out = new Map<string, T>();
      for (const key of sortedUnique(keyOrKeys)) {
        const entry = found.get(key);
        if (entry?.present) out.set(key, entry.decode() as T);
      }
      return out;
    }
    const entry = await readOne(this.object, keyOrKeys);
    return entry.present ? (entry.decode() as T) : undefined;
  }

  put<T>(key: string, value: T, options?: StoragePutOptions): Promise<void>;
  put<T>(entries: Record<string, T>, options?: StoragePutOptions): Promise<void>;
  async put<T>(keyOrEntries: string | Record<string, T>, value?: T | StoragePutOptions, _options?: StoragePutOptions): Promise<void> {
    if (typeof keyOrEntries === "string") {
      checkKey(keyOrEntries);
      const encoded = encodeValue(value);
      await this.object.putRaw(keyOrEntries, encoded.bytes, encoded.contentType);
      return;
    }
    const entries = entriesOf(keyOrEntries);
    if (entries.length === 0) return;
    await this.object.batch(entries.map(([key, v]) => putOp(key, encodeValue(v))));
  }

  delete(key: string, options?: StoragePutOptions): Promise<boolean>;
  delete(keys: string[], options?: StoragePutOptions): Promise<number>;
  async delete(keyOrKeys: string | string[], _options?: StoragePutOptions): Promise<boolean | number> {
    if (!Array.isArray(keyOrKeys)) return (await this.object.deleteRaw(keyOrKeys)).deleted;
    const keys = sortedUnique(keyOrKeys);
    if (keys.length === 0) return 0;
    checkCount(keys.length, "delete()");
    const answer = await this.object.batch(keys.map((key): BatchOp => ({ op: "delete", key })));
    return answer.results.filter((r) => r.op === "delete" && r.deleted).length;
  }

  async list<T = unknown>(options: StorageListOptions = {}): Promise<Map<string, T>> {
    const limit = checkListOptions(options);
    const out = new Map<string, T>();
    if (limit === 0) return out;
    for await (const item of serverListing(this.object, options, limit)) {
      out.set(item.key, decodeEmbedded(item.value, item.encoding, item.content_type) as T);
      if (out.size === limit) break;
    }
    return out;
  }

  /** Deletes every key, and also the object's blobs (the server's delete-all covers both). */
  async deleteAll(_options?: StoragePutOptions): Promise<void> {
    await this.object.deleteAll();
  }

  /**
   * Runs `closure` as an optimistic transaction: reads record the version they
   * saw, writes are buffered, and the commit is one batch in which every key
   * read carries a condition on that version (or on its absence). When another
   * writer changed a key in between, the batch is refused as a whole and the
   * closure runs again, up to `maxAttempts` times.
   */
  async transaction<T>(closure: (txn: StatehouseTransaction) => Promise<T>, options: TransactionOptions = {}): Promise<T> {
    const maxAttempts = options.maxAttempts ?? 10;
    let last: StatehouseError | undefined;
    let lastKey: string | undefined;
    for (let attempt = 1; attempt <= maxAttempts; attempt++) {
      const txn = new StatehouseTransaction(this.object);
      const started = Date.now();
      let result: T;
      try {
        result = await closure(txn);
        await txn.commit();
        return result;
      } catch (err) {
        if (!(err instanceof Conflict)) throw err;
        last = err.problem;
        lastKey = err.key;
      } finally {
        txn.close();
      }
      if (attempt < maxAttempts) await sleep(conflictBackoff(attempt, Date.now() - started));
    }
    throw new TransactionConflictError(maxAttempts, last!, lastKey);
  }

  /** Every acknowledged write is already durable (the server fsyncs before answering). */
  async sync(): Promise<void> {}
}

/**
 * A transaction's view of the object: its own writes, over what it has read,
 * over the server's current state. Reads are repeatable: a key is fetched
 * once, and later reads (list included) see the same value.
 */
export class StatehouseTransaction implements StorageOperations {
  private readonly reads = new Map<string, Entry>();
  private readonly writes = new Map<string, { put: EncodedValue } | { put: null }>();
  private readRequests = 0;
  private rolledBack = false;
  private closed = false;

  constructor(private readonly object: StatehouseObject) {}

  get<T = unknown>(key: string, options?: StorageGetOptions): Promise<T | undefined>;
  get<T = unknown>(keys: string[], options?: StorageGetOptions): Promise<Map<string, T>>;
  async get<T>(keyOrKeys: string | string[], _options?: StorageGetOptions): Promise<T | undefined | Map<string, T>> {
    this.usable();
    if (Array.isArray(keyOrKeys)) {
      const keys = sortedUnique(keyOrKeys);
      await this.fetch(keys);
      const out = new Map<string, T>();
      for (const key of keys) {
        const entry = this.view(key);
        if (entry?.present) out.set(key, entry.decode() as T);
      }
      return out;
    }
    checkKey(keyOrKeys);
    await this.fetch([keyOrKeys]);
    const entry = this.view(keyOrKeys);
    return entry?.present ? (entry.decode() as T) : undefined;
  }

  put<T>(key: string, value: T, options?: StoragePutOptions): Promise<void>;
  put<T>(entries: Record<string, T>, options?: StoragePutOptions): Promise<void>;
  async put<T>(keyOrEntries: string | Record<string, T>, value?: T | StoragePutOptions, _options?: StoragePutOptions): Promise<void> {
    this.usable();
    const entries: [string, unknown][] = typeof keyOrEntries === "string" ? [[keyOrEntries, value]] : entriesOf(keyOrEntries);
    // Encoded now, so that a value that cannot be stored fails at put(), as on Durable Objects.
    const encoded = entries.map(([key, v]) => {
      checkKey(key);
      return [key, encodeValue(v)] as const;
    });
    for (const [key, put] of encoded) this.writes.set(key, { put });
  }

  delete(key: string, options?: StoragePutOptions): Promise<boolean>;
  delete(keys: string[], options?: StoragePutOptions): Promise<number>;
  async delete(keyOrKeys: string | string[], _options?: StoragePutOptions): Promise<boolean | number> {
    this.usable();
    const keys = Array.isArray(keyOrKeys) ? sortedUnique(keyOrKeys) : [keyOrKeys];
    keys.forEach((key) => checkKey(key));
    // The answer says whether each key existed, so it depends on (and records) a read.
    await this.fetch(keys);
    let deleted = 0;
    for (const key of keys) {
      if (this.view(key)?.present) deleted++;
      this.writes.set(key, { put: null });
    }
    return Array.isArray(keyOrKeys) ? deleted : deleted === 1;
  }

  async list<T = unknown>(options: StorageListOptions = {}): Promise<Map<string, T>> {
    this.usable();
    const limit = checkListOptions(options);
    const out = new Map<string, T>();
    if (limit === 0) return out;
    const direction = options.reverse ? -1 : 1;
    const inRange = rangeFilter(options);
    // Keys this transaction knows about (its writes, what it read) come from its own view.
    const known = [...new Set([...this.writes.keys(), ...this.reads.keys()])]
      .filter((key) => inRange(key) && this.view(key)?.present)
      .sort((a, b) => direction * compareKeys(a, b));
    let k = 0;
    const emit = (key: string) => {
      const entry = this.view(key);
      if (entry?.present) out.set(key, entry.decode() as T);
      return out.size === limit;
    };
    this.readRequests++;
    const pages = serverListing(this.object, options, limit === undefined ? undefined : limit + this.writes.size + this.reads.size, () => this.readRequests++);
    for await (const item of pages) {
      while (k < known.length && direction * compareKeys(known[k]!, item.key) < 0) {
        if (emit(known[k++]!)) return out;
      }
      if (k < known.length && known[k] === item.key) k++;
      if (!this.reads.has(item.key)) this.reads.set(item.key, fromListed(item));
      if (this.view(item.key)?.present && emit(item.key)) return out;
    }
    while (k < known.length) {
      if (emit(known[k++]!)) return out;
    }
    return out;
  }

  /** Discards the transaction's writes: nothing is committed. */
  rollback(): void {
    this.usable();
    this.rolledBack = true;
  }

  /** @internal */
  close(): void {
    this.closed = true;
  }

  /** @internal Commits as one conditioned batch; throws Conflict when a read no longer holds. */
  async commit(): Promise<void> {
    if (this.rolledBack) return;
    const ops: BatchOp[] = [];
    // Deleting a key read as absent changes nothing: it only needs the absence to still hold.
    const writes = [...this.writes].filter(([key, w]) => w.put !== null || this.reads.get(key)?.present !== false);
    if (writes.length === 0) {
      await this.validateReads();
      return;
    }
    const keys = [...new Set([...this.reads.keys(), ...this.writes.keys()])].sort(compareKeys);
    for (const key of keys) {
      const read = this.reads.get(key);
      const write = this.writes.get(key);
      if (write?.put) {
        const op = putOp(key, write.put);
        if (read?.present) op.if_version = read.version;
        else if (read) op.if_absent = true;
        ops.push(op);
      } else if (write) {
        if (read?.present) ops.push({ op: "delete", key, if_version: read.version });
        else if (read) ops.push(...assertAbsent(key));
        else ops.push({ op: "delete", key });
      } else if (read?.present) {
        // No op checks a version without writing: the value goes back unchanged, under the condition.
        ops.push({ op: "put", key, ...wireFields(read.wire()), if_version: read.version } as BatchOp);
      } else if (read) {
        ops.push(...assertAbsent(key));
      }
    }
    if (ops.length > MAX_BATCH_OPS) {
      throw new RangeError(
        `this transaction commits as ${ops.length} batch ops, more than the server's ${MAX_BATCH_OPS}: ` +
          "every key read or written is one op (a key read as absent and not put, two)",
      );
    }
    const outcome = { ambiguous: false, attempts: 0 };
    try {
      await this.object.batch(ops, { outcome });
    } catch (err) {
      if (err instanceof StatehouseError && err.status === 412) {
        if (outcome.ambiguous) throw new CommitOutcomeUnknownError(err);
        const failed = err.opIndex === undefined ? undefined : ops[err.opIndex];
        throw new Conflict(err, failed && "key" in failed ? failed.key : undefined);
      }
      throw err;
    }
  }

  /**
   * A transaction that writes nothing commits nothing, but what it read must
   * have been one state: reads made in one request are; otherwise one atomic
   * batch of gets checks that every key still has the version it was read at.
   */
  private async validateReads(): Promise<void> {
    if (this.readRequests <= 1 || this.reads.size === 0) return;
    const keys = [...this.reads.keys()];
    if (keys.length > MAX_BATCH_OPS) {
      throw new RangeError(`a read-only transaction checks its reads in one batch: at most ${MAX_BATCH_OPS} keys, this one read ${keys.length}`);
    }
    const answer = await this.object.batch(keys.map((key): BatchOp => ({ op: "get", key })));
    for (const result of answer.results) {
      const read = this.reads.get(result.key)!;
      const now = result.op === "get" && result.found ? result.version : null;
      if (now !== (read.present ? read.version : null)) {
        throw new Conflict(
          new StatehouseError({
            type: "https://statehouse.dev/problems/precondition-failed",
            status: 412,
            title: "Precondition failed",
            detail: `key ${JSON.stringify(result.key)} changed while the transaction read`,
            requestId: undefined,
          }),
          result.key,
        );
      }
    }
  }

  /** Reads the keys not yet known, in one request (a GET for one key, a batch for several). */
  private async fetch(keys: string[]): Promise<void> {
    const missing = keys.filter((key) => !this.writes.has(key) && !this.reads.has(key));
    if (missing.length === 0) return;
    this.readRequests++;
    if (missing.length === 1) {
      this.reads.set(missing[0]!, await readOne(this.object, missing[0]!));
      return;
    }
    for (const [key, entry] of await readMany(this.object, missing)) this.reads.set(key, entry);
  }

  private view(key: string): Entry | undefined {
    const write = this.writes.get(key);
    if (write) {
      const put = write.put;
      return put ? { present: true, version: 0, decode: () => decodeBytes(put.bytes, put.contentType), wire: () => ({ contentType: put.contentType, base64: bytesToBase64(put.bytes) }) } : ABSENT;
    }
    return this.reads.get(key);
  }

  private usable(): void {
    if (this.closed) throw new Error("this transaction has ended: use the txn only inside its transaction() closure");
  }
}

/** Thrown inside transaction() to run the closure again. */
class Conflict extends Error {
  constructor(
    readonly problem: StatehouseError,
    readonly key: string | undefined,
  ) {
    super(problem.message);
  }
}

interface Wire {
  contentType: string;
  json?: unknown;
  base64?: string;
}

type Entry =
  | { present: true; version: number; decode: () => unknown; wire: () => Wire }
  | { present: false; version?: undefined; decode?: undefined; wire?: undefined };

const ABSENT: Entry = { present: false };

async function readOne(object: StatehouseObject, key: string): Promise<Entry> {
  const raw = await object.getRaw(key);
  if (!raw) return ABSENT;
  return {
    present: true,
    version: raw.version,
    decode: () => decodeBytes(raw.bytes, raw.contentType),
    wire: () => ({ contentType: raw.contentType, base64: bytesToBase64(raw.bytes) }),
  };
}

async function readMany(object: StatehouseObject, keys: string[]): Promise<Map<string, Entry>> {
  const unique = sortedUnique(keys);
  unique.forEach((key) => checkKey(key));
  const out = new Map<string, Entry>();
  if (unique.length === 0) return out;
  checkCount(unique.length, "get()");
  const answer = await object.batch(unique.map((key): BatchOp => ({ op: "get", key })));
  for (const result of answer.results) out.set(result.key, fromBatchGet(result));
  return out;
}

function fromBatchGet(result: BatchResult): Entry {
  if (result.op !== "get" || !result.found) return ABSENT;
  const { value, encoding, content_type: contentType, version } = result;
  return {
    present: true,
    version,
    decode: () => decodeEmbedded(value, encoding, contentType),
    wire: () => ({ contentType, ...embeddedToWire(value, encoding, contentType) }),
  };
}

function fromListed(item: ListedKey): Entry {
  const { value, encoding, content_type: contentType, version } = item;
  return {
    present: true,
    version,
    decode: () => decodeEmbedded(value, encoding, contentType),
    wire: () => ({ contentType, ...embeddedToWire(value, encoding, contentType) }),
  };
}

/**
 * The server's listing for Durable Objects' list options, page after page:
 * `startAfter` becomes `start` at the next possible key (the key followed by
 * U+0000), or, for a key already at the length limit, `start` at the key with
 * the key itself skipped.
 */
async function* serverListing(
  object: StatehouseObject,
  options: StorageListOptions,
  wanted: number | undefined,
  onRequest?: () => void,
): AsyncGenerator<ListedKey> {
  let start = options.start;
  let skip: string | undefined;
  if (options.startAfter !== undefined) {
    if (utf8Length(options.startAfter) < 2048) start = `${options.startAfter}\u0000`;
    else {
      start = options.startAfter;
      skip = options.startAfter;
    }
  }
  let cursor: string | undefined;
  let first = true;
  do {
    if (!first) onRequest?.();
    first = false;
    const most = object.client.listPageSize;
    const pageSize = wanted === undefined ? most : Math.min(most, Math.max(1, wanted + (skip ? 1 : 0)));
    const page = await object.listPage({ prefix: options.prefix, start, end: options.end, reverse: options.reverse, limit: pageSize, cursor });
    for (const item of page.items) {
      if (item.key !== skip) yield item;
    }
    cursor = page.cursor ?? undefined;
  } while (cursor !== undefined);
}

function rangeFilter(options: StorageListOptions): (key: string) => boolean {
  return (key) =>
    (options.prefix === undefined || key.startsWith(options.prefix)) &&
    (options.start === undefined || compareKeys(key, options.start) >= 0) &&
    (options.startAfter === undefined || compareKeys(key, options.startAfter) > 0) &&
    (options.end === undefined || compareKeys(key, options.end) < 0);
}

function checkListOptions(options: StorageListOptions): number | undefined {
  if (options.start !== undefined && options.startAfter !== undefined) {
    throw new TypeError("list() takes start or startAfter, not both");
  }
  for (const bound of ["start", "startAfter", "end", "prefix"] as const) {
    const value = options[bound];
    if (value !== undefined && typeof value !== "string") throw new TypeError(`list() option ${bound} must be a string`);
  }
  const { limit } = options;
  if (limit === undefined) return undefined;
  if (!Number.isInteger(limit) || limit < 1) throw new RangeError(`list() limit must be a positive integer, got ${limit}`);
  return limit;
}

function checkCount(count: number, call: string): void {
  if (count > MAX_BATCH_OPS) {
    throw new RangeError(`${call} takes at most ${MAX_BATCH_OPS} keys (one atomic batch, as on Durable Objects), got ${count}`);
  }
}

function entriesOf<T>(entries: Record<string, T>): [string, T][] {
  if (entries === null || typeof entries !== "object" || Array.isArray(entries)) {
    throw new TypeError("put() takes a key and a value, or an object of entries");
  }
  const list = Object.entries(entries);
  checkCount(list.length, "put()");
  list.forEach(([key]) => checkKey(key));
  return list;
}

function putOp(key: string, encoded: EncodedValue): BatchOp & { op: "put" } {
  if (encoded.json !== undefined) return { op: "put", key, value: encoded.json, content_type: encoded.contentType };
  return { op: "put", key, value_base64: bytesToBase64(encoded.bytes), content_type: encoded.contentType };
}

function wireFields(wire: Wire): { value?: unknown; value_base64?: string; content_type: string } {
  return wire.base64 !== undefined
    ? { value_base64: wire.base64, content_type: wire.contentType }
    : { value: wire.json, content_type: wire.contentType };
}

/** No op checks absence without writing: create-if-absent, then delete, in the same atomic batch. */
function assertAbsent(key: string): BatchOp[] {
  return [
    { op: "put", key, value: null, if_absent: true },
    { op: "delete", key },
  ];
}

function sortedUnique(keys: string[]): string[] {
  if (!Array.isArray(keys)) throw new TypeError("expected an array of keys");
  return [...new Set(keys)].sort(compareKeys);
}

/**
 * Full jitter over a window that doubles with each conflict, in units of how
 * long the failed attempt took: contenders spread out over several attempt
 * lengths instead of colliding again, whatever the server's latency.
 */
function conflictBackoff(attempt: number, attemptMs: number): number {
  return Math.random() * Math.min(2000, Math.max(attemptMs, 1) * 2 ** attempt);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
