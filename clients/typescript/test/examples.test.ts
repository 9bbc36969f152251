import assert from "node:assert/strict";
import type { AddressInfo } from "node:net";
import { describe, test } from "node:test";
import { Statehouse } from "../src/index.js";
import { loadWorker } from "../examples/durable-objects/adapter.js";
import { cartServer } from "../examples/http-server.js";
import { serverForFile, uniqueName } from "./support.js";

const server = serverForFile();

// The example files as they are in the repository (not tsc's copies of them).
const source = (name: string) => new URL(`../../examples/durable-objects/${name}`, import.meta.url);

async function text(worker: { fetch(r: Request): Promise<Response> }, path: string, init?: RequestInit): Promise<[number, string]> {
  const response = await worker.fetch(new Request(`https://example.com${path}`, init));
  return [response.status, await response.text()];
}

describe("Cloudflare's counter example, unchanged", () => {
  test("answers what the documentation shows: print, increment, decrement by name", async () => {
    const client = new Statehouse({ baseUrl: server.baseUrl });
    const worker = await loadWorker(source("counter.js"), { client, bindings: { COUNTERS: "Counter" }, namespaces: { COUNTERS: uniqueName("counters") } });
    assert.deepEqual(await text(worker, "/?name=A"), [200, "Durable Object 'A' count: 0"]);
    assert.deepEqual(await text(worker, "/increment?name=A"), [200, "Durable Object 'A' count: 1"]);
    assert.deepEqual(await text(worker, "/increment?name=A"), [200, "Durable Object 'A' count: 2"]);
    assert.deepEqual(await text(worker, "/decrement?name=A"), [200, "Durable Object 'A' count: 1"]);
    assert.deepEqual(await text(worker, "/?name=A"), [200, "Durable Object 'A' count: 1"]);
    assert.deepEqual(await text(worker, "/?name=B"), [200, "Durable Object 'B' count: 0"]);
    assert.deepEqual(await text(worker, "/nowhere?name=A"), [404, "Not found"]);
    assert.deepEqual(await text(worker, "/"), [
      200,
      "Select a Durable Object to contact by using the `name` URL query string parameter, for example, ?name=A",
    ]);
  });

  test("the state is in Statehouse: a second process (a fresh adapter) reads the same count", async () => {
    const namespaces = { COUNTERS: uniqueName("counters") };
    const first = await loadWorker(source("counter.js"), { client: new Statehouse({ baseUrl: server.baseUrl }), bindings: { COUNTERS: "Counter" }, namespaces });
    await text(first, "/increment?name=shared");
    await text(first, "/increment?name=shared");
    const second = await loadWorker(source("counter.js"), { client: new Statehouse({ baseUrl: server.baseUrl }), bindings: { COUNTERS: "Counter" }, namespaces });
    assert.deepEqual(await text(second, "/?name=shared"), [200, "Durable Object 'shared' count: 2"]);
    const object = new Statehouse({ baseUrl: server.baseUrl }).object(namespaces.COUNTERS, "shared");
    assert.equal(await object.storage.get("value"), 2);
  });

  test("the input gate: 50 concurrent increments of one object through one adapter count to 50, each answer distinct", async () => {
    const worker = await loadWorker(source("counter.js"), {
      client: new Statehouse({ baseUrl: server.baseUrl }),
      bindings: { COUNTERS: "Counter" },
      namespaces: { COUNTERS: uniqueName("counters") },
    });
    const answers = await Promise.all(Array.from({ length: 50 }, () => text(worker, "/increment?name=C")));
    const counts = answers.map(([, body]) => Number(body.match(/count: (\d+)$/)![1])).sort((a, b) => a - b);
    assert.deepEqual(counts, Array.from({ length: 50 }, (_, i) => i + 1));
    assert.deepEqual(await text(worker, "/?name=C"), [200, "Durable Object 'C' count: 50"]);
  });

  test("transaction mode: two processes (two adapters, two gates) incrementing one object concurrently lose nothing", async () => {
    const namespaces = { COUNTERS: uniqueName("counters") };
    const load = () => loadWorker(source("counter.js"), { client: new Statehouse({ baseUrl: server.baseUrl }), bindings: { COUNTERS: "Counter" }, namespaces, mode: "transaction" });
    const [a, b] = [await load(), await load()];
    const answers = await Promise.all(Array.from({ length: 40 }, (_, i) => text(i % 2 ? a : b, "/increment?name=D")));
    const counts = answers.map(([, body]) => Number(body.match(/count: (\d+)$/)![1])).sort((x, y) => x - y);
    assert.deepEqual(counts, Array.from({ length: 40 }, (_, i) => i + 1));
    assert.deepEqual(await text(a, "/?name=D"), [200, "Durable Object 'D' count: 40"]);
  });
});

describe("the chat room's message history", () => {
  test("keeps messages in the order sent; a newcomer sees the last 100, oldest first", async () => {
    const client = new Statehouse({ baseUrl: server.baseUrl });
    const ns = uniqueName("rooms");
    const worker = await loadWorker(source("chat-room.js"), { client, bindings: { ROOMS: "ChatRoom" }, namespaces: { ROOMS: ns } });
    for (let i = 1; i <= 105; i++) {
      const [status] = await text(worker, "/rooms/lobby/messages", { method: "POST", body: JSON.stringify({ name: i % 2 ? "alice" : "bob", message: `message ${i}` }) });
      assert.equal(status, 200);
    }
    const [status, body] = await text(worker, "/rooms/lobby/messages");
    assert.equal(status, 200);
    const history = JSON.parse(body) as { name: string; message: string; timestamp: number }[];
    assert.equal(history.length, 100);
    assert.deepEqual(history.map((m) => m.message), Array.from({ length: 100 }, (_, i) => `message ${i + 6}`));
    for (let i = 1; i < history.length; i++) assert.ok(history[i]!.timestamp > history[i - 1]!.timestamp);
    // Stored as the demo stores them: a JSON string under the message's ISO time.
    const keys = [...(await client.object(ns, "lobby").storage.list({ limit: 2 })).keys()];
    assert.deepEqual(keys.map((k) => new Date(k).toISOString()), keys);
    assert.deepEqual(await text(worker, "/rooms/empty/messages"), [200, "[]"]);
    assert.equal((await text(worker, "/rooms/lobby/messages", { method: "POST", body: "{}" }))[0], 400);
    assert.equal((await text(worker, "/elsewhere"))[0], 404);
  });
});

describe("a plain Node HTTP route using the client", () => {
  // Eight adds: a transaction conflicts only with another add's commit, so none can use up its 10 attempts.
  test("concurrent adds to a cart all land; the cart reads back; errors map to statuses", async () => {
    const app = cartServer(new Statehouse({ baseUrl: server.baseUrl }));
    await new Promise<void>((resolve) => app.listen(0, "127.0.0.1", resolve));
    const base = `http://127.0.0.1:${(app.address() as AddressInfo).port}`;
    try {
      const cart = `${base}/carts/${uniqueName("user")}`;
      const adds = await Promise.all(
        Array.from({ length: 8 }, (_, i) => fetch(`${cart}/items`, { method: "POST", body: JSON.stringify({ item: `item-${i}` }) })),
      );
      assert.deepEqual(adds.map((r) => r.status), Array(8).fill(201));
      const { items } = (await (await fetch(cart)).json()) as { items: string[] };
      assert.deepEqual([...items].sort(), Array.from({ length: 8 }, (_, i) => `item-${i}`).sort());
      assert.equal((await fetch(`${cart}/items`, { method: "POST", body: "{}" })).status, 400);
      assert.equal((await fetch(`${base}/elsewhere`)).status, 404);
      assert.equal((await fetch(cart, { method: "DELETE" })).status, 204);
      assert.deepEqual(await (await fetch(cart)).json(), { items: [] });
    } finally {
      app.closeAllConnections();
      await new Promise((resolve) => app.close(resolve));
    }
  });
});
