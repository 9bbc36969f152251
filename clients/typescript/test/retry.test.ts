// Retries against a scripted loopback server: each test lists the answers it
// gives in order, and checks what the client sent and when.
import assert from "node:assert/strict";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { after, before, beforeEach, describe, test } from "node:test";
import { Statehouse, StatehouseError, StatehouseNetworkError } from "../src/index.js";

interface Hit {
  method: string;
  url: string;
  requestId: string | undefined;
  at: number;
  body: string;
}
type Answer = (req: IncomingMessage, res: ServerResponse) => void;

let server: Server;
let baseUrl: string;
let hits: Hit[];
let script: Answer[];

const problem = (status: number, kind: string, headers: Record<string, string> = {}): Answer => (_req, res) => {
  res.writeHead(status, { "content-type": "application/problem+json", ...headers });
  res.end(JSON.stringify({ type: `https://statehouse.dev/problems/${kind}`, title: kind, status, detail: `scripted ${status}` }));
};
const ok = (body: unknown, headers: Record<string, string> = {}): Answer => (_req, res) => {
  res.writeHead(200, { "content-type": "application/json", ...headers });
  res.end(JSON.stringify(body));
};
const hangUp: Answer = (req) => req.socket.destroy();
const silent: Answer = () => {};

before(async () => {
  server = createServer((req, res) => {
    let body = "";
    req.on("data", (chunk) => (body += chunk));
    req.on("end", () => {
      hits.push({ method: req.method!, url: req.url!, requestId: req.headers["x-request-id"] as string | undefined, at: Date.now(), body });
      const answer = script.shift() ?? problem(500, "internal");
      answer(req, res);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  baseUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});
after(async () => {
  server.closeAllConnections();
  await new Promise((resolve) => server.close(resolve));
});
beforeEach(() => {
  hits = [];
  script = [];
});

const fast = { baseDelayMs: 5, maxDelayMs: 20 };

describe("retries", () => {
  test("503 with Retry-After: 1, then 200: retried after the second the server asked for, with the same request id", async () => {
    script = [problem(503, "unavailable", { "retry-after": "1" }), ok({ version: 7 })];
    const client = new Statehouse({ baseUrl, retry: fast });
    const started = Date.now();
    await client.object("ns", "id").storage.put("k", "v");
    const waited = hits[1]!.at - hits[0]!.at;
    assert.equal(hits.length, 2);
    assert.ok(waited >= 1000, `the retry came after ${waited} ms, before the Retry-After second`);
    assert.ok(Date.now() - started < 5000);
    assert.equal(hits[0]!.method, "PUT");
    assert.equal(hits[0]!.requestId, hits[1]!.requestId);
    assert.equal(hits[1]!.body, '"v"');
  });

  test("a 400 is never retried", async () => {
    script = [problem(400, "bad-request"), ok({})];
    const client = new Statehouse({ baseUrl, retry: fast });
    const err = await client.object("ns", "id").storage.get("k").catch((e: unknown) => e);
    assert.ok(err instanceof StatehouseError);
    assert.equal(err.status, 400);
    assert.equal(hits.length, 1);
  });

  test("nor is any other client error: 401, 403, 409 conflict, 412, 413", async () => {
    const client = new Statehouse({ baseUrl, retry: fast });
    for (const [status, kind] of [[401, "unauthorized"], [403, "forbidden"], [409, "conflict"], [412, "precondition-failed"], [413, "payload-too-large"]] as const) {
      hits = [];
      script = [problem(status, kind), ok({ version: 1 })];
      const err = await client.object("ns", "id").storage.put("k", 1).catch((e: unknown) => e);
      assert.ok(err instanceof StatehouseError && err.status === status && err.kind === kind, `${status}`);
      assert.equal(hits.length, 1, `${status} was retried`);
    }
  });

  test("429 is retried, honouring its Retry-After (0 here); 409 fenced is retried", async () => {
    script = [problem(429, "rate-limited", { "retry-after": "0" }), problem(409, "fenced"), ok({ deleted: true, version: 3 })];
    const client = new Statehouse({ baseUrl, retry: fast });
    assert.equal(await client.object("ns", "id").storage.delete("k"), true);
    assert.equal(hits.length, 3);
  });

  test("backoff is exponential with jitter when no Retry-After is given, and gives up after maxAttempts", async () => {
    script = Array.from({ length: 10 }, () => problem(503, "unavailable"));
    const client = new Statehouse({ baseUrl, retry: { maxAttempts: 4, baseDelayMs: 40, maxDelayMs: 1000 } });
    const err = await client.object("ns", "id").storage.get("k").catch((e: unknown) => e);
    assert.ok(err instanceof StatehouseError && err.status === 503);
    assert.equal(hits.length, 4);
    const gaps = hits.slice(1).map((h, i) => h.at - hits[i]!.at);
    // Equal jitter: each wait is between half and all of 40, 80, 160 ms.
    for (const [i, gap] of gaps.entries()) {
      const cap = 40 * 2 ** i;
      assert.ok(gap >= cap / 2 - 5 && gap <= cap + 60, `wait ${i + 1} was ${gap} ms, expected ${cap / 2}-${cap}`);
    }
  });

  test("a Retry-After longer than maxRetryAfterMs ends the retries at once", async () => {
    script = [problem(503, "unavailable", { "retry-after": "120" }), ok({})];
    const client = new Statehouse({ baseUrl, retry: { ...fast, maxRetryAfterMs: 5000 } });
    const err = await client.object("ns", "id").storage.get("k").catch((e: unknown) => e);
    assert.ok(err instanceof StatehouseError);
    assert.equal(err.retryAfter, 120);
    assert.equal(hits.length, 1);
  });

  test("POSTs that could do something twice are not retried: events", async () => {
    script = [problem(503, "unavailable", { "retry-after": "0" }), ok({ version: 1, event_ids: ["e"] })];
    const client = new Statehouse({ baseUrl, retry: fast });
    const err = await client.object("ns", "id").emit("E").catch((e: unknown) => e);
    assert.ok(err instanceof StatehouseError && err.status === 503);
    assert.equal(hits.length, 1);
  });

  test("conditional batches (a transaction's commit) and batches of fixed puts are retried", async () => {
    const client = new Statehouse({ baseUrl, retry: fast });
    script = [
      // The transaction's read of "n" (absent), then its commit: 503, then applied.
      problem(404, "not-found"),
      problem(503, "unavailable", { "retry-after": "0" }),
      ok({ version: 1, results: [{ op: "put", key: "n", version: 1 }], event_ids: [] }),
    ];
    await client.object("ns", "id").storage.transaction(async (txn) => {
      await txn.put("n", ((await txn.get<number>("n")) ?? 0) + 1);
    });
    assert.deepEqual(hits.map((h) => h.method), ["GET", "POST", "POST"]);
    assert.deepEqual(JSON.parse(hits[1]!.body), { ops: [{ op: "put", key: "n", value: 1, content_type: "application/json", if_absent: true }] });
    hits = [];
    script = [problem(503, "unavailable", { "retry-after": "0" }), ok({ version: 2, results: [], event_ids: [] })];
    await client.object("ns", "id").storage.put({ a: 1, b: 2 });
    assert.equal(hits.length, 2);
  });

  test("a commit whose first attempt got no certain answer and whose retry is refused reports an unknown outcome, and is not run again", async () => {
    const client = new Statehouse({ baseUrl, retry: fast });
    script = [problem(404, "not-found"), problem(503, "unavailable", { "retry-after": "0" }), problem(412, "precondition-failed")];
    let runs = 0;
    const err = await client
      .object("ns", "id")
      .storage.transaction(async (txn) => {
        runs++;
        await txn.put("n", ((await txn.get<number>("n")) ?? 0) + 1);
      })
      .catch((e: unknown) => e);
    assert.ok(err instanceof StatehouseError);
    assert.equal((err as Error).name, "CommitOutcomeUnknownError");
    assert.equal(runs, 1);
  });

  test("a lost connection is retried for idempotent requests; a timeout too, and ends in StatehouseNetworkError", async () => {
    script = [hangUp, ok({ items: [], cursor: null })];
    const client = new Statehouse({ baseUrl, retry: fast });
    assert.equal((await client.object("ns", "id").storage.list()).size, 0);
    assert.equal(hits.length, 2);

    hits = [];
    script = [silent, silent];
    const slow = new Statehouse({ baseUrl, timeoutMs: 200, retry: { ...fast, maxAttempts: 2 } });
    const started = Date.now();
    const err = await slow.object("ns", "id").storage.get("k").catch((e: unknown) => e);
    assert.ok(err instanceof StatehouseNetworkError, String(err));
    assert.equal(err.timedOut, true);
    assert.equal(hits.length, 2);
    assert.ok(Date.now() - started >= 400);
    assert.equal(err.requestId, hits[0]!.requestId);
  });

  test("a stream body is sent once: it cannot be replayed", async () => {
    script = [problem(503, "unavailable", { "retry-after": "0" }), ok({})];
    const client = new Statehouse({ baseUrl, retry: fast });
    const body = new ReadableStream<Uint8Array>({
      start(c) {
        c.enqueue(new Uint8Array([1]));
        c.close();
      },
    });
    const err = await client.object("ns", "id").blobs.put("b", body).catch((e: unknown) => e);
    assert.ok(err instanceof StatehouseError && err.status === 503);
    assert.equal(hits.length, 1);
  });
});
