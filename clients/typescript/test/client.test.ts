import assert from "node:assert/strict";
import { createHmac, randomBytes } from "node:crypto";
import { describe, test } from "node:test";
import { Statehouse, StatehouseError } from "../src/index.js";
import { makeToken, serverForFile, uniqueName } from "./support.js";

const open = serverForFile();

// A second server with access control: hashed bearer tokens and HS256 JWTs.
const admin = makeToken("admin", "*", "read,write,admin");
const writer = makeToken("writer", "auth.*", "read,write");
const reader = makeToken("reader", "auth.*", "read");
const jwtSecret = randomBytes(32).toString("hex");
const secured = serverForFile({
  STATEHOUSE_AUTH_TOKENS: [admin.line, writer.line, reader.line].join("\n"),
  STATEHOUSE_PEER_SECRET: randomBytes(32).toString("hex"),
  STATEHOUSE_JWT_HS256_SECRET: jwtSecret,
  STATEHOUSE_JWT_AUDIENCE: "statehouse-tests",
  STATEHOUSE_JWT_ISSUER: "ts-client",
});

function jwt(claims: Record<string, unknown>): string {
  const part = (o: unknown) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${body}.${createHmac("sha256", jwtSecret).update(body).digest("base64url")}`;
}

async function rejection(promise: Promise<unknown>): Promise<StatehouseError> {
  const err = await promise.then(
    () => assert.fail("expected the call to fail"),
    (e: unknown) => e,
  );
  assert.ok(err instanceof StatehouseError, `expected a StatehouseError, got ${String(err)}`);
  return err;
}

describe("errors", () => {
  test("a problem answer becomes a StatehouseError with type, kind, status, title, detail and the request id", async () => {
    const client = new Statehouse({ baseUrl: open.baseUrl });
    const err = await rejection(client.object("NOT A NAMESPACE", "x").storage.get("k"));
    assert.equal(err.type, "https://statehouse.dev/problems/bad-request");
    assert.equal(err.kind, "bad-request");
    assert.equal(err.status, 400);
    assert.equal(err.title, "Bad request");
    assert.match(err.detail, /namespace/);
    assert.equal(err.opIndex, undefined);
    assert.match(err.requestId ?? "", /^[0-9a-f-]{36}$/);
    assert.match(err.message, /^400 Bad request: /);
  });

  test("412 from If-Match, 412 with the op index from a batch condition", async () => {
    const object = new Statehouse({ baseUrl: open.baseUrl }).object(uniqueName("errors"), "o");
    const version = await object.putRaw("k", new TextEncoder().encode("1"), "application/json");
    await object.putRaw("k", new TextEncoder().encode("2"), "application/json", { ifMatch: version });
    const single = await rejection(object.putRaw("k", new TextEncoder().encode("3"), "application/json", { ifMatch: version }));
    assert.equal(single.kind, "precondition-failed");
    assert.equal(single.status, 412);
    assert.equal(single.opIndex, undefined);
    const created = await rejection(object.putRaw("k", new Uint8Array([1]), "application/octet-stream", { ifNoneMatch: "*" }));
    assert.equal(created.kind, "precondition-failed");
    const batch = await rejection(
      object.batch([
        { op: "put", key: "a", value: 1 },
        { op: "delete", key: "k", if_version: version },
      ]),
    );
    assert.equal(batch.kind, "precondition-failed");
    assert.equal(batch.opIndex, 1);
    assert.equal(await object.storage.get("a"), undefined, "a refused batch applies nothing");
  });

  test("413 for a value over the server's limit, 416 for a range past a blob's end, 409 conflict for presign on a local folder", async () => {
    const object = new Statehouse({ baseUrl: open.baseUrl }).object(uniqueName("errors"), "o");
    const tooBig = await rejection(object.storage.put("big", new Uint8Array(2 * 1024 * 1024 + 1)));
    assert.equal(tooBig.kind, "payload-too-large");
    assert.equal(tooBig.status, 413);
    await object.blobs.put("b", new Uint8Array(10));
    const range = await rejection(object.blobs.get("b", { range: { offset: 10 } }));
    assert.equal(range.kind, "range-not-satisfiable");
    assert.equal(range.status, 416);
    const presign = await rejection(object.blobs.presign("b", { method: "GET" }));
    assert.equal(presign.kind, "conflict");
    assert.equal(presign.status, 409);
  });

  test("an answer that is not a problem document (from a proxy, say) is still a StatehouseError", async () => {
    const client = new Statehouse({
      baseUrl: "http://proxy.invalid",
      fetch: async () => new Response("<html>bad gateway</html>", { status: 502, statusText: "Bad Gateway", headers: { "content-type": "text/html" } }),
    });
    const err = await rejection(client.object("a", "b").storage.get("k"));
    assert.equal(err.status, 502);
    assert.equal(err.type, "about:blank");
    assert.equal(err.title, "Bad Gateway");
    assert.match(err.detail, /bad gateway/);
  });
});

describe("request id", () => {
  test("every call carries x-request-id (the same on each retry); the server echoes it; errors name it", async () => {
    const sent: string[] = [];
    const echoed: string[] = [];
    let n = 0;
    const client = new Statehouse({
      baseUrl: open.baseUrl,
      requestId: () => `ts-test-${++n}`,
      fetch: async (input, init) => {
        sent.push(new Headers(init?.headers).get("x-request-id") ?? "(none)");
        const response = await fetch(input, init);
        echoed.push(response.headers.get("x-request-id") ?? "(none)");
        return response;
      },
    });
    const object = client.object(uniqueName("rid"), "o");
    await object.storage.put("k", 1);
    await object.storage.get("k");
    await object.storage.list();
    await object.emit("E");
    await object.blobs.put("b", "x");
    const err = await rejection(client.object("BAD", "o").storage.get("k"));
    assert.deepEqual(sent, ["ts-test-1", "ts-test-2", "ts-test-3", "ts-test-4", "ts-test-5", "ts-test-6"]);
    assert.deepEqual(echoed, sent);
    assert.equal(err.requestId, "ts-test-6");
  });

  test("without a generator each call gets a fresh UUID", async () => {
    const seen: string[] = [];
    const client = new Statehouse({
      baseUrl: open.baseUrl,
      fetch: async (input, init) => {
        seen.push(new Headers(init?.headers).get("x-request-id")!);
        return fetch(input, init);
      },
    });
    await client.health();
    await client.health();
    assert.equal(seen.length, 2);
    assert.notEqual(seen[0], seen[1]);
    for (const id of seen) assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  });
});

describe("access control", () => {
  test("no token is 401 unauthorized; a right not granted is 403 forbidden", async () => {
    const ns = `auth.${uniqueName("t")}`;
    const none = await rejection(new Statehouse({ baseUrl: secured.baseUrl }).object(ns, "o").storage.get("k"));
    assert.equal(none.kind, "unauthorized");
    assert.equal(none.status, 401);
    const bad = await rejection(new Statehouse({ baseUrl: secured.baseUrl, token: "sh_not-a-token" }).object(ns, "o").storage.get("k"));
    assert.equal(bad.kind, "unauthorized");
    const readOnly = new Statehouse({ baseUrl: secured.baseUrl, token: reader.token }).object(ns, "o");
    assert.equal(await readOnly.storage.get("k"), undefined);
    const forbidden = await rejection(readOnly.storage.put("k", 1));
    assert.equal(forbidden.kind, "forbidden");
    assert.equal(forbidden.status, 403);
    const elsewhere = await rejection(new Statehouse({ baseUrl: secured.baseUrl, token: writer.token }).object("other", "o").storage.put("k", 1));
    assert.equal(elsewhere.kind, "forbidden");
  });

  test("a token string works for its namespaces; admin calls need the admin right", async () => {
    const ns = `auth.${uniqueName("t")}`;
    const w = new Statehouse({ baseUrl: secured.baseUrl, token: writer.token });
    await w.object(ns, "o").storage.put("k", "v");
    assert.equal(await w.object(ns, "o").storage.get("k"), "v");
    assert.equal((await rejection(w.analyticsTables())).kind, "forbidden");
    assert.equal((await rejection(w.exportNow())).kind, "forbidden");
    assert.equal((await rejection(w.metrics())).kind, "forbidden");
    const a = new Statehouse({ baseUrl: secured.baseUrl, token: admin.token });
    const tables = await a.analyticsTables();
    assert.deepEqual(tables.tables.map((t) => t.name).sort(), ["statehouse.changes", "statehouse.events"]);
    assert.match(await a.metrics(), /statehouse_/);
  });

  test("an async token provider is asked before every request (JWTs stay fresh); an expired JWT is 401", async () => {
    const ns = `auth.${uniqueName("t")}`;
    let asked = 0;
    const client = new Statehouse({
      baseUrl: secured.baseUrl,
      token: async () => {
        asked++;
        return jwt({
          sub: "user-42",
          aud: "statehouse-tests",
          iss: "ts-client",
          exp: Math.floor(Date.now() / 1000) + 60,
          statehouse: { namespaces: ["auth.*"], rights: ["read", "write"] },
        });
      },
    });
    await client.object(ns, "o").storage.put("k", 1);
    assert.equal(await client.object(ns, "o").storage.get("k"), 1);
    assert.equal(asked, 2);
    const expired = new Statehouse({
      baseUrl: secured.baseUrl,
      token: () => jwt({ sub: "u", aud: "statehouse-tests", iss: "ts-client", exp: Math.floor(Date.now() / 1000) - 3600, statehouse: { namespaces: ["*"], rights: ["read"] } }),
    });
    assert.equal((await rejection(expired.object(ns, "o").storage.get("k"))).kind, "unauthorized");
  });
});

describe("events", () => {
  test("emit records one event and bumps the version; emitMany records several; a batch may carry events", async () => {
    const object = new Statehouse({ baseUrl: open.baseUrl }).object(uniqueName("events"), "o");
    const one = await object.emit("OrderPlaced", { total: 42.5 });
    assert.equal(one.version, 1);
    assert.match(one.eventId, /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-/);
    const many = await object.emitMany([
      { type: "A", data: [1] },
      { type: "B", ts: new Date("2026-01-01T00:00:00Z") },
      { type: "C", ts: "2026-01-02T00:00:00+02:00" },
    ]);
    assert.equal(many.version, 2);
    assert.equal(many.event_ids.length, 3);
    const batch = await object.batch([{ op: "put", key: "k", value: 1 }], { events: [{ type: "KeySet", data: { key: "k" } }] });
    assert.equal(batch.version, 3);
    assert.equal(batch.event_ids.length, 1);
    await assert.rejects(object.emitMany([]), RangeError);
    await assert.rejects(object.emitMany(Array.from({ length: 1001 }, () => ({ type: "x" }))), RangeError);
    assert.equal((await rejection(object.emit(""))).kind, "bad-request");
    assert.equal((await rejection(object.emit("T", null, { ts: "yesterday" }))).kind, "bad-request");
  });
});

describe("blobs", () => {
  const blobs = () => new Statehouse({ baseUrl: open.baseUrl }).object(uniqueName("blobs"), "o").blobs;

  test("upload bytes, an ArrayBuffer, a string, a Blob and a stream; download whole, head, metadata", async () => {
    const b = blobs();
    const bytes = Uint8Array.from({ length: 300_000 }, (_, i) => i % 251);
    const written = await b.put("dir/bytes.bin", bytes, {
      contentType: "application/x-test",
      cacheControl: "max-age=60",
      contentDisposition: 'attachment; filename="bytes.bin"',
      metadata: { Source: "scanner", batch: "7" },
    });
    assert.equal(written.name, "dir/bytes.bin");
    assert.equal(written.size, 300_000);
    assert.match(written.sha256, /^[0-9a-f]{64}$/);
    assert.equal(written.etag, `"${written.version}"`);
    const got = await b.get("dir/bytes.bin");
    assert.ok(got);
    assert.deepEqual(await got.bytes(), bytes);
    assert.equal(got.size, 300_000);
    assert.equal(got.version, written.version);
    assert.equal(got.sha256, written.sha256);
    assert.equal(got.contentType, "application/x-test");
    assert.equal(got.cacheControl, "max-age=60");
    assert.equal(got.contentDisposition, 'attachment; filename="bytes.bin"');
    assert.deepEqual(got.metadata, { source: "scanner", batch: "7" });
    assert.equal(got.range, undefined);
    const head = await b.head("dir/bytes.bin");
    assert.equal(head?.size, 300_000);
    assert.equal(head?.version, written.version);

    await b.put("ab", new Uint8Array([1, 2, 3]).buffer);
    assert.deepEqual(await (await b.get("ab"))!.bytes(), new Uint8Array([1, 2, 3]));
    await b.put("s.txt", "héllo");
    const text = await b.get("s.txt");
    assert.equal(await text!.text(), "héllo");
    assert.equal(text!.contentType, "text/plain; charset=utf-8");
    await b.put("blob", new Blob(["from a Blob"], { type: "text/x-blob" }));
    assert.equal((await b.get("blob"))!.contentType, "text/x-blob");
    const chunks = [new Uint8Array([1, 2]), new Uint8Array([3]), new Uint8Array([4, 5, 6])];
    const stream = new ReadableStream<Uint8Array>({
      pull(controller) {
        const next = chunks.shift();
        if (next) controller.enqueue(next);
        else controller.close();
      },
    });
    const streamed = await b.put("stream", stream);
    assert.equal(streamed.size, 6);
    assert.deepEqual(await (await b.get("stream"))!.bytes(), new Uint8Array([1, 2, 3, 4, 5, 6]));
  });

  test("ranged downloads: offset+length, offset to the end, suffix", async () => {
    const b = blobs();
    await b.put("r", new TextEncoder().encode("0123456789"));
    const mid = await b.get("r", { range: { offset: 2, length: 3 } });
    assert.equal(await mid!.text(), "234");
    assert.deepEqual(mid!.range, { offset: 2, length: 3 });
    assert.equal(mid!.size, 10);
    assert.equal(await (await b.get("r", { range: { offset: 7 } }))!.text(), "789");
    const tail = await b.get("r", { range: { suffix: 4 } });
    assert.equal(await tail!.text(), "6789");
    assert.deepEqual(tail!.range, { offset: 6, length: 4 });
    await assert.rejects(b.get("r", { range: { offset: -1 } }), RangeError);
  });

  test("missing blobs read as null; delete answers whether it existed; conditions hold", async () => {
    const b = blobs();
    assert.equal(await b.get("none"), null);
    assert.equal(await b.head("none"), null);
    assert.equal(await b.delete("none"), false);
    const first = await b.put("c", "1", { ifNoneMatch: "*" });
    assert.equal((await rejection(b.put("c", "2", { ifNoneMatch: "*" }))).kind, "precondition-failed");
    const second = await b.put("c", "2", { ifMatch: first.version });
    assert.equal((await rejection(b.delete("c", { ifMatch: first.version }))).kind, "precondition-failed");
    assert.equal(await b.delete("c", { ifMatch: second.version }), true);
    await assert.rejects(b.get("../escape"), RangeError);
  });

  test("list pages by name with a prefix; all() follows the cursors", async () => {
    const b = blobs();
    for (const name of ["a/1", "a/2", "a/3", "b/1"]) await b.put(name, name);
    const page = await b.list({ prefix: "a/", limit: 2 });
    assert.deepEqual(page.items.map((i) => i.name), ["a/1", "a/2"]);
    assert.ok(page.cursor);
    const rest = await b.list({ prefix: "a/", limit: 2, cursor: page.cursor! });
    assert.deepEqual(rest.items.map((i) => i.name), ["a/3"]);
    const names: string[] = [];
    for await (const item of b.all({ pageSize: 1 })) names.push(item.name);
    assert.deepEqual(names, ["a/1", "a/2", "a/3", "b/1"]);
    assert.equal(page.items[0]!.content_type, "text/plain; charset=utf-8");
  });

  test("commit refuses an upload key that presign did not hand out", async () => {
    const b = blobs();
    assert.equal((await rejection(b.commit("x", { uploadKey: "blobs/elsewhere/nope" }))).kind, "bad-request");
  });
});

describe("objects, operations and admin", () => {
  test("info of an object, null for one never written; a namespace's objects page by page", async () => {
    const client = new Statehouse({ baseUrl: open.baseUrl });
    const ns = uniqueName("objects");
    assert.equal(await client.object(ns, "none").info(), null);
    for (const id of ["o1", "o2", "o3", "p1"]) await client.object(ns, id).storage.put("k", id);
    const info = await client.object(ns, "o1").info();
    assert.equal(info?.ns, ns);
    assert.equal(info?.id, "o1");
    assert.equal(info?.keys, 1);
    assert.equal(info?.version, 1);
    assert.ok((info?.fence ?? 0) >= 1);
    const page = await client.listObjects(ns, { prefix: "o", limit: 2 });
    assert.deepEqual(page.items.map((o) => o.id), ["o1", "o2"]);
    assert.ok(page.cursor);
    const ids: string[] = [];
    for await (const o of client.objects(ns, { pageSize: 1 })) ids.push(o.id);
    assert.deepEqual(ids, ["o1", "o2", "o3", "p1"]);
    const deleted = await client.object(ns, "o1").deleteAll();
    assert.equal(deleted.deleted_keys, 1);
  });

  test("history, restore and fork", async () => {
    const client = new Statehouse({ baseUrl: open.baseUrl });
    const object = client.object(uniqueName("restore"), "o");
    await object.storage.put("k", "first"); // version 1
    await object.storage.put("k", "second"); // version 2
    const history = await object.history({ limit: 1 });
    assert.deepEqual(history.versions.map((v) => v.version), [2]);
    assert.equal(history.cursor, "2");
    const restored = await object.restore({ version: 1 }, { ifMatch: 2 });
    assert.equal(restored.version, 3);
    assert.equal(restored.restored_from.version, 1);
    assert.equal(await object.storage.get("k"), "first");
    const forked = await object.restore({ at: new Date() }, { into: "copy" });
    assert.equal(forked.id, "copy");
    assert.equal(await client.object(object.ns, "copy").storage.get("k"), "first");
    await assert.rejects(object.restore({ version: 1 }, { ifMatch: 2 }), (e: StatehouseError) => e.status === 412);
    await assert.rejects(object.restore({ version: 1 }, { into: "copy" }), (e: StatehouseError) => e.status === 409);
  });

  test("health, readiness, the OpenAPI document, metrics, export and the analytics tables (snapshot ids exact)", async () => {
    const client = new Statehouse({ baseUrl: open.baseUrl });
    assert.equal(await client.health(), true);
    assert.equal(await client.ready(), true);
    const doc = (await client.openapi()) as { openapi: string };
    assert.match(doc.openapi, /^3\./);
    assert.match(await client.metrics(), /statehouse_/);
    await client.object(uniqueName("export"), "o").emit("Exported", { n: 1 });
    const exported = await client.exportNow();
    assert.equal(typeof exported.nothing_to_do, "boolean");
    const tables = await client.analyticsTables();
    const events = tables.tables.find((t) => t.name === "statehouse.events");
    assert.ok(events?.exists);
    assert.equal(typeof events.current_snapshot_id, "string");
    assert.match(events.current_snapshot_id!, /^-?\d+$/);
    const ids = exported.snapshots.map((s) => s.snapshot_id);
    for (const id of ids) assert.match(id, /^-?\d+$/);
    // The id must be the server's exact digits: compare with the raw document text.
    const raw = await (await fetch(`${open.baseUrl}/v1/analytics/tables`)).text();
    assert.ok(raw.includes(`"current_snapshot_id":${events.current_snapshot_id}`), raw);
  });
});
