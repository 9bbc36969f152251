import type { components } from "./generated/openapi.js";
import { StatehouseError, StatehouseNetworkError, parseRetryAfter } from "./errors.js";
import { StatehouseObject } from "./object.js";

type Schemas = components["schemas"];
export type ObjectSummary = Schemas["ObjectSummaryBody"];
export type ListObjectsPage = Schemas["ListObjectsBody"];

// Iceberg snapshot ids are 64-bit and routinely above 2^53, where a JSON
// number loses digits in JavaScript: they are handed out as decimal strings.
export type CommittedSnapshot = Omit<Schemas["CommittedSnapshot"], "snapshot_id"> & { snapshot_id: string };
export type ExportResult = Omit<Schemas["ExportBody"], "snapshots"> & { snapshots: CommittedSnapshot[] };
export type TableInfo = Omit<Schemas["TableInfo"], "current_snapshot_id"> & { current_snapshot_id?: string | null };
export type AnalyticsTables = Omit<Schemas["TablesBody"], "tables"> & { tables: TableInfo[] };

/** A bearer token, or a function that returns one (called before every attempt, so JWTs can be refreshed). */
export type TokenSource = string | (() => string | Promise<string>);

export interface RetryOptions {
  /** Attempts in all, the first included. Default 5. */
  maxAttempts?: number;
  /** First backoff; doubles each retry. Default 100 ms. */
  baseDelayMs?: number;
  /** Backoff cap. Default 5,000 ms. */
  maxDelayMs?: number;
  /** The longest `Retry-After` honoured; a longer one ends the retries. Default 30,000 ms. */
  maxRetryAfterMs?: number;
}

export interface StatehouseOptions {
  /** e.g. `http://127.0.0.1:8080`. */
  baseUrl: string;
  token?: TokenSource;
  /** Per attempt. Default 30,000 ms (the server's own default request timeout). */
  timeoutMs?: number;
  retry?: RetryOptions;
  /** Defaults to the global fetch. */
  fetch?: typeof fetch;
  /** Makes the `x-request-id` of each call (kept across its retries). Default: a random UUID. */
  requestId?: () => string;
  /** Keys per request when `list()` pages through the server's cursors: 1-10,000, default 1,000. */
  listPageSize?: number;
}

/** When a failed attempt may be sent again. */
export type RetryPolicy =
  /** GET/HEAD/PUT/DELETE, conditional writes, and batches of fixed puts/deletes: sending twice leaves what sending once does. */
  | "idempotent"
  /** POSTs whose repetition would do something twice (events). */
  | "never";

export interface RequestInit2 {
  method: "GET" | "HEAD" | "PUT" | "DELETE" | "POST";
  path: string;
  query?: Record<string, string | number | boolean | undefined>;
  headers?: Record<string, string | undefined>;
  /** Sent as JSON (content-type application/json). */
  json?: unknown;
  body?: BodyInit | Uint8Array | null;
  /** Default: idempotent for GET/HEAD/PUT/DELETE, never for POST. */
  retry?: RetryPolicy;
  /** Statuses handed back as responses instead of thrown (e.g. 404 for "absent", 304). */
  accept?: number[];
  signal?: AbortSignal;
  /** Set to true when any attempt ended without a certain answer (it may have been applied). */
  outcome?: { ambiguous: boolean; attempts: number };
}

export interface StatehouseResponse {
  response: Response;
  requestId: string;
}

const RETRYABLE_STATUS = new Set([429, 503]);

/**
 * The Statehouse client. `object(ns, id)` gives an object's storage (the
 * Durable Objects storage API), events, blobs and info; the rest are
 * namespace-wide and operator calls.
 */
export class Statehouse {
  readonly baseUrl: string;
  private readonly token: TokenSource | undefined;
  private readonly timeoutMs: number;
  private readonly retry: Required<RetryOptions>;
  private readonly fetchImpl: typeof fetch;
  private readonly makeRequestId: () => string;
  /** @internal */
  readonly listPageSize: number;

  constructor(options: StatehouseOptions) {
    if (!options || typeof options.baseUrl !== "string" || options.baseUrl === "") {
      throw new TypeError("Statehouse needs a baseUrl, e.g. http://127.0.0.1:8080");
    }
    this.baseUrl = options.baseUrl.replace(/\/+$/, "");
    this.token = options.token;
    this.timeoutMs = options.timeoutMs ?? 30_000;
    this.retry = {
      maxAttempts: Math.max(1, options.retry?.maxAttempts ?? 5),
      baseDelayMs: options.retry?.baseDelayMs ?? 100,
      maxDelayMs: options.retry?.maxDelayMs ?? 5_000,
      maxRetryAfterMs: options.retry?.maxRetryAfterMs ?? 30_000,
    };
    const impl = options.fetch ?? globalThis.fetch;
    if (typeof impl !== "function") throw new TypeError("no fetch: pass options.fetch on runtimes without a global fetch");
    this.fetchImpl = impl.bind(globalThis);
    this.makeRequestId = options.requestId ?? (() => crypto.randomUUID());
    this.listPageSize = options.listPageSize ?? 1000;
    if (!Number.isInteger(this.listPageSize) || this.listPageSize < 1 || this.listPageSize > 10_000) {
      throw new RangeError(`listPageSize is 1 to 10000, got ${options.listPageSize}`);
    }
  }

  /** One object: `storage` (DurableObjectStorage), events, blobs, info. */
  object(ns: string, id: string): StatehouseObject {
    return new StatehouseObject(this, ns, id);
  }

  /** One page of a namespace's objects, in id order. */
  async listObjects(ns: string, options: { prefix?: string; limit?: number; cursor?: string } = {}): Promise<ListObjectsPage> {
    const { response } = await this.request({
      method: "GET",
      path: `/v1/objects/${encodeURIComponent(ns)}`,
      query: { prefix: options.prefix, limit: options.limit, cursor: options.cursor },
    });
    return (await response.json()) as ListObjectsPage;
  }

  /** Every object of a namespace, following cursors. */
  async *objects(ns: string, options: { prefix?: string; pageSize?: number } = {}): AsyncGenerator<ObjectSummary> {
    let cursor: string | undefined;
    do {
      const page = await this.listObjects(ns, { prefix: options.prefix, limit: options.pageSize, cursor });
      yield* page.items;
      cursor = page.cursor ?? undefined;
    } while (cursor !== undefined);
  }

  /** Runs an export cycle to the Iceberg tables now (admin). */
  async exportNow(): Promise<ExportResult> {
    // Not idempotent in effect (it commits snapshots), but repeating it only exports what is left.
    const { response } = await this.request({ method: "POST", path: "/v1/admin/export", retry: "idempotent" });
    return parseWithBigIds(await response.text()) as ExportResult;
  }

  /** The Iceberg tables: snapshots, rows, files, metadata location, rows waiting (admin). */
  async analyticsTables(): Promise<AnalyticsTables> {
    const { response } = await this.request({ method: "GET", path: "/v1/analytics/tables" });
    return parseWithBigIds(await response.text()) as AnalyticsTables;
  }

  /** `/healthz`: the process answers. */
  async health(): Promise<boolean> {
    const { response } = await this.request({ method: "GET", path: "/healthz", accept: [503] });
    await response.body?.cancel();
    return response.ok;
  }

  /** `/readyz`: the database is reachable and migrated. */
  async ready(): Promise<boolean> {
    const { response } = await this.request({ method: "GET", path: "/readyz", accept: [503], retry: "never" });
    await response.body?.cancel();
    return response.ok;
  }

  /** The server's OpenAPI document. */
  async openapi(): Promise<unknown> {
    const { response } = await this.request({ method: "GET", path: "/openapi.json" });
    return response.json();
  }

  /** Prometheus metrics text (admin). */
  async metrics(): Promise<string> {
    const { response } = await this.request({ method: "GET", path: "/metrics" });
    return response.text();
  }

  /**
   * One call, with retries: 503 and 429 (waiting `Retry-After` when given),
   * 409 `fenced`, and lost connections or timeouts, each only when `retry` is
   * `idempotent`. Every attempt carries the call's `x-request-id`.
   */
  async request(init: RequestInit2): Promise<StatehouseResponse> {
    const requestId = this.makeRequestId();
    const policy = init.retry ?? (init.method === "POST" ? "never" : "idempotent");
    // A stream can be sent once only.
    const replayable = !(init.body instanceof ReadableStream);
    const maxAttempts = policy === "idempotent" && replayable ? this.retry.maxAttempts : 1;
    const url = this.url(init.path, init.query);
    const outcome = init.outcome ?? { ambiguous: false, attempts: 0 };
    for (let attempt = 1; ; attempt++) {
      outcome.attempts = attempt;
      const headers = new Headers();
      headers.set("x-request-id", requestId);
      for (const [name, value] of Object.entries(init.headers ?? {})) {
        if (value !== undefined) headers.set(name, value);
      }
      const token = await this.resolveToken();
      if (token !== undefined) headers.set("authorization", `Bearer ${token}`);
      let body: BodyInit | null | undefined = init.body as BodyInit | null | undefined;
      if (init.json !== undefined) {
        headers.set("content-type", "application/json");
        body = JSON.stringify(init.json);
      }
      const timeout = new AbortController();
      const timer = setTimeout(() => timeout.abort(), this.timeoutMs);
      const onAbort = () => timeout.abort();
      init.signal?.addEventListener("abort", onAbort, { once: true });
      let response: Response;
      try {
        const requestInit: RequestInit & { duplex?: "half" } = { method: init.method, headers, body, signal: timeout.signal };
        if (body instanceof ReadableStream) requestInit.duplex = "half";
        response = await this.fetchImpl(url, requestInit);
      } catch (err) {
        clearTimeout(timer);
        init.signal?.removeEventListener("abort", onAbort);
        if (init.signal?.aborted) throw init.signal.reason ?? err;
        const timedOut = timeout.signal.aborted;
        // The request may have reached the server and been applied.
        if (init.method !== "GET" && init.method !== "HEAD") outcome.ambiguous = true;
        if (attempt < maxAttempts) {
          await sleep(this.backoff(attempt));
          continue;
        }
        const what = timedOut ? `timed out after ${this.timeoutMs} ms` : `failed: ${err instanceof Error ? err.message : String(err)}`;
        throw new StatehouseNetworkError(`${init.method} ${init.path} ${what}`, requestId, timedOut, err);
      }
      clearTimeout(timer);
      init.signal?.removeEventListener("abort", onAbort);
      if (response.ok || init.accept?.includes(response.status)) return { response, requestId };

      const error = await StatehouseError.fromResponse(response, requestId);
      const retryable = RETRYABLE_STATUS.has(error.status) || (error.status === 409 && error.kind === "fenced");
      // A 503 may come from a request that timed out after its write was queued; 429 and
      // `fenced` are decided before anything is applied.
      if (error.status === 503 && init.method !== "GET" && init.method !== "HEAD") outcome.ambiguous = true;
      if (!retryable || attempt >= maxAttempts) throw error;
      let delay = this.backoff(attempt);
      if (error.retryAfter !== undefined) {
        const wanted = error.retryAfter * 1000;
        if (wanted > this.retry.maxRetryAfterMs) throw error;
        // Honour the server's wait; the jitter keeps many clients from returning together.
        delay = wanted + Math.random() * Math.min(250, this.retry.baseDelayMs);
      }
      await sleep(delay);
    }
  }

  private backoff(attempt: number): number {
    const cap = Math.min(this.retry.maxDelayMs, this.retry.baseDelayMs * 2 ** (attempt - 1));
    // "Equal jitter": at least half the backoff, so retries never bunch at zero.
    return cap / 2 + Math.random() * (cap / 2);
  }

  private async resolveToken(): Promise<string | undefined> {
    if (this.token === undefined) return undefined;
    const token = typeof this.token === "function" ? await this.token() : this.token;
    if (typeof token !== "string" || token === "") throw new TypeError("the token provider returned no token");
    return token;
  }

  private url(path: string, query: RequestInit2["query"]): string {
    const params = new URLSearchParams();
    for (const [name, value] of Object.entries(query ?? {})) {
      if (value !== undefined) params.set(name, String(value));
    }
    const search = params.toString();
    return `${this.baseUrl}${path}${search ? `?${search}` : ""}`;
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** JSON.parse, with the 64-bit snapshot ids kept as exact decimal strings. */
function parseWithBigIds(text: string): unknown {
  return JSON.parse(text.replace(/("(?:current_)?snapshot_id"\s*:\s*)(-?\d+)/g, '$1"$2"'));
}
