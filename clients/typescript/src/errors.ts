import type { components } from "./generated/openapi.js";

/** The problem document the server answers every error with (RFC 9457). */
export type Problem = components["schemas"]["Problem"];

/** Problem types are `https://statehouse.dev/problems/<kind>`; `kind` is the last part. */
export const PROBLEM_BASE = "https://statehouse.dev/problems/";

/**
 * An error answer from the server. `type`, `status`, `title`, `detail` and
 * `opIndex` come from its problem document; `requestId` is the `x-request-id`
 * the request carried, to find it in the server's logs.
 */
export class StatehouseError extends Error {
  readonly type: string;
  readonly kind: string;
  readonly status: number;
  readonly title: string;
  readonly detail: string;
  /** The batch op whose condition failed (412 on a batch). */
  readonly opIndex: number | undefined;
  readonly requestId: string | undefined;
  /** Seconds, from `Retry-After` (429 and 503). */
  readonly retryAfter: number | undefined;

  constructor(init: {
    type: string;
    status: number;
    title: string;
    detail: string;
    opIndex?: number | undefined;
    requestId?: string | undefined;
    retryAfter?: number | undefined;
    message?: string;
  }) {
    super(init.message ?? `${init.status} ${init.title}: ${init.detail}`);
    this.name = "StatehouseError";
    this.type = init.type;
    this.kind = init.type.startsWith(PROBLEM_BASE) ? init.type.slice(PROBLEM_BASE.length) : init.type;
    this.status = init.status;
    this.title = init.title;
    this.detail = init.detail;
    this.opIndex = init.opIndex;
    this.requestId = init.requestId;
    this.retryAfter = init.retryAfter;
  }

  /** Builds the error from a response that is not ok; reads (consumes) its body. */
  static async fromResponse(response: Response, requestId: string | undefined): Promise<StatehouseError> {
    const text = await response.text().catch(() => "");
    const retryAfter = parseRetryAfter(response.headers.get("retry-after"));
    const echoed = response.headers.get("x-request-id") ?? requestId;
    const contentType = response.headers.get("content-type") ?? "";
    if (contentType.includes("json")) {
      try {
        const problem = JSON.parse(text) as Partial<Problem>;
        if (problem && typeof problem.type === "string") {
          return new StatehouseError({
            type: problem.type,
            status: typeof problem.status === "number" ? problem.status : response.status,
            title: problem.title ?? response.statusText,
            detail: problem.detail ?? "",
            opIndex: typeof problem.op_index === "number" ? problem.op_index : undefined,
            requestId: echoed,
            retryAfter,
          });
        }
      } catch {
        // Not a problem document after all: described below from the status alone.
      }
    }
    // Something between the client and the server (a proxy, a load balancer) answered.
    return new StatehouseError({
      type: "about:blank",
      status: response.status,
      title: response.statusText || `HTTP ${response.status}`,
      detail: text.slice(0, 500),
      requestId: echoed,
      retryAfter,
    });
  }
}

/** The request never got an answer: the connection failed or the attempt timed out. */
export class StatehouseNetworkError extends Error {
  readonly requestId: string;
  readonly timedOut: boolean;

  constructor(message: string, requestId: string, timedOut: boolean, cause?: unknown) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "StatehouseNetworkError";
    this.requestId = requestId;
    this.timedOut = timedOut;
  }
}

/**
 * `transaction()` gave up: every attempt found a key it had read changed by
 * someone else before it could commit. Nothing of the transaction was written.
 */
export class TransactionConflictError extends StatehouseError {
  readonly attempts: number;
  /** The key whose condition failed last, when the server named it. */
  readonly key: string | undefined;

  constructor(attempts: number, last: StatehouseError, key: string | undefined) {
    super({
      ...problemOf(last),
      message: `transaction conflicted on every one of ${attempts} attempts` + (key === undefined ? "" : ` (last on key ${JSON.stringify(key)})`),
    });
    this.name = "TransactionConflictError";
    this.attempts = attempts;
    this.key = key;
  }
}

/**
 * A transaction's commit may or may not have been applied: an attempt got no
 * certain answer (timeout, lost connection, 503) and the retry then found its
 * conditions no longer holding, which is also what its own earlier success
 * would look like. Running the closure again could apply it twice, so the
 * caller decides (read the state and check).
 */
export class CommitOutcomeUnknownError extends StatehouseError {
  constructor(last: StatehouseError) {
    super({
      ...problemOf(last),
      message:
        "the transaction's commit may or may not have been applied: an attempt got no certain answer, " +
        `and its retry was refused (${last.status} ${last.detail})`,
    });
    this.name = "CommitOutcomeUnknownError";
  }
}

/** The problem an error carries, to wrap it in another error. */
function problemOf(last: StatehouseError) {
  return {
    type: last.type,
    status: last.status,
    title: last.title,
    detail: last.detail,
    opIndex: last.opIndex,
    requestId: last.requestId,
  };
}

/** `Retry-After` as seconds: delta-seconds or an HTTP date; undefined when absent or unreadable. */
export function parseRetryAfter(value: string | null): number | undefined {
  if (value === null || value.trim() === "") return undefined;
  const trimmed = value.trim();
  if (/^\d+$/.test(trimmed)) return Number(trimmed);
  const date = Date.parse(trimmed);
  if (Number.isNaN(date)) return undefined;
  return Math.max(0, (date - Date.now()) / 1000);
}
