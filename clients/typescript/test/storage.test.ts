import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  Statehouse,
  StatehouseError,
  STRUCTURED_CONTENT_TYPE,
  TransactionConflictError,
  compareKeys,
  type StatehouseObject,
} from "../src/index.js";
import { serverForFile, uniqueName } from "./support.js";

const server = serverForFile();
const client = () => new Statehouse({ baseUrl: server.baseUrl });
const fresh = (): StatehouseObject => client().object(uniqueName("storage"), "obj");

describe("get / put / delete", () => {
  test("single keys: missing reads undefined, put then get, delete answers whether it existed", async () => {
    const { storage } = fresh();
    assert.equal(await storage.get("nope"), undefined);
    await storage.put("a", { n: 1, list: [1, "two", null, true] });
    assert.deepEqual(await storage.get("a"), { n: 1, list: [1, "two", null, true] });
    await storage.put("a", "replaced");
    assert.equal(await storage.get("a"), "replaced");
    assert.equal(await storage.delete("a"), true);
    assert.equal(await storage.delete("a"), false);
    assert.equal(await storage.get("a"), undefined);
  });

  test("multi-key get answers a Map of the found keys only, in key order", async () => {
    const { storage } = fresh();
    await storage.put({ b: 2, a: 1, c: 3 });
    const got = await storage.get(["c", "missing", "a", "a"]);
    assert.ok(got instanceof Map);
    assert.deepEqual([...got], [["a", 1], ["c", 3]]);
    assert.deepEqual(await storage.get([]), new Map());
  });

  test("multi-key put and delete are one atomic batch: one version bump", async () => {
    const object = fresh();
    await object.storage.put({ x: 1, y: 2, z: 3 });
    assert.equal((await object.info())!.version, 1);
    assert.equal(await object.storage.delete(["x", "y", "nope"]), 2);
    assert.equal((await object.info())!.version, 2);
    assert.deepEqual([...(await object.storage.list())], [["z", 3]]);
  });

  test("a multi-key call with a bad key fails as a whole: nothing is written", async () => {
    const object = fresh();
    const tooLong = "k".repeat(2049);
    await assert.rejects(object.storage.put({ ok: 1, [tooLong]: 2 }), RangeError);
    assert.equal(await object.info(), null);
  });

  test("129 keys are refused client-side with a clear error, 128 are fine (the server's cap, as Durable Objects')", async () => {
    const { storage } = fresh();
    const entries = (n: number) => Object.fromEntries(Array.from({ length: n }, (_, i) => [`k${String(i).padStart(3, "0")}`, i]));
    await assert.rejects(storage.put(entries(129)), /at most 128 keys/);
    await assert.rejects(storage.get(Object.keys(entries(129))), /at most 128 keys/);
    await assert.rejects(storage.delete(Object.keys(entries(129))), /at most 128 keys/);
    await storage.put(entries(128));
    assert.equal((await storage.get(Object.keys(entries(128)))).size, 128);
    assert.equal(await storage.delete(Object.keys(entries(128))), 128);
  });

  test("keys are 1-2048 bytes of UTF-8; unpaired surrogates and non-strings are refused", async () => {
    const { storage } = fresh();
    await assert.rejects(storage.put("", 1), RangeError);
    await assert.rejects(storage.put("é".repeat(1025), 1), RangeError); // 2050 bytes
    await storage.put("é".repeat(1024), "max"); // 2048 bytes
    assert.equal(await storage.get("é".repeat(1024)), "max");
    await assert.rejects(storage.put("\ud800", 1), TypeError);
    await assert.rejects(storage.get(42 as unknown as string), TypeError);
  });

  test("keys the URL path would mangle round-trip: dots, slashes, percent signs, spaces, NUL, emoji", async () => {
    const { storage } = fresh();
    const keys = [".", "..", "a/../b", "a/./b", "/lead", "trail/", "a//b", "100%", "q?x=1#f", "sp ace", "nul\u0000x", "😀", "\n"];
    for (const [i, key] of keys.entries()) await storage.put(key, i);
    for (const [i, key] of keys.entries()) assert.equal(await storage.get(key), i, key);
    assert.deepEqual([...(await storage.list()).keys()], [...keys].sort(compareKeys));
    for (const key of keys) assert.equal(await storage.delete(key), true, key);
    assert.equal((await storage.list()).size, 0);
  });

  test("putting undefined is refused (a missing key already reads as undefined)", async () => {
    const { storage } = fresh();
    await assert.rejects(storage.put("u", undefined), TypeError);
    await assert.rejects(storage.put({ u: undefined }), TypeError);
  });

  test("Durable Objects' options are accepted and change nothing", async () => {
    const { storage } = fresh();
    await storage.put("k", 1, { allowUnconfirmed: true, allowConcurrency: true, noCache: true });
    assert.equal(await storage.get("k", { allowConcurrency: true, noCache: true }), 1);
    assert.deepEqual([...(await storage.list({ noCache: true }))], [["k", 1]]);
    assert.equal(await storage.delete("k", { allowUnconfirmed: true }), true);
  });
});

describe("values", () => {
  test("JSON values are stored as JSON that other clients read", async () => {
    const object = fresh();
    await object.storage.put("j", { a: [1, 2.5, "x", null, false, { "$not": "a tag" }] });
    const raw = await object.getRaw("j");
    assert.equal(raw!.contentType, "application/json");
    assert.deepEqual(JSON.parse(new TextDecoder().decode(raw!.bytes)), { a: [1, 2.5, "x", null, false, { $not: "a tag" }] });
    assert.deepEqual(await object.storage.get("j"), { a: [1, 2.5, "x", null, false, { $not: "a tag" }] });
  });

  test("raw bytes are stored as bytes; Uint8Array and ArrayBuffer each come back as what was put", async () => {
    const object = fresh();
    const bytes = new Uint8Array([0, 1, 2, 253, 254, 255]);
    await object.storage.put("u8", bytes);
    await object.storage.put("ab", bytes.buffer.slice(1, 4));
    await object.storage.put("utf8", new TextEncoder().encode("plain text bytes"));
    const raw = await object.getRaw("u8");
    assert.equal(raw!.contentType, "application/octet-stream");
    assert.deepEqual([...raw!.bytes], [...bytes]);
    const u8 = await object.storage.get("u8");
    assert.ok(u8 instanceof Uint8Array);
    assert.deepEqual(u8, bytes);
    const ab = await object.storage.get("ab");
    assert.ok(ab instanceof ArrayBuffer);
    assert.deepEqual([...new Uint8Array(ab)], [1, 2, 253]);
    // Through the embedded forms (batch get and list), including bytes that happen to be UTF-8.
    const many = await object.storage.get(["u8", "ab", "utf8"]);
    assert.deepEqual(many.get("u8"), bytes);
    assert.deepEqual([...new Uint8Array(many.get("ab") as ArrayBuffer)], [1, 2, 253]);
    assert.deepEqual(many.get("utf8"), new TextEncoder().encode("plain text bytes"));
    const listed = await object.storage.list();
    assert.deepEqual(listed.get("u8"), bytes);
    assert.deepEqual(listed.get("utf8"), new TextEncoder().encode("plain text bytes"));
  });

  test("structured-clone types JSON cannot carry round-trip, nested too, under their own content type", async () => {
    const object = fresh();
    const value = {
      when: new Date("2026-01-02T03:04:05.678Z"),
      big: 2n ** 70n,
      negBig: -5n,
      map: new Map<unknown, unknown>([["a", 1], [2, new Set([1, "x", NaN])], [new Date(0), [undefined, -0]]]),
      set: new Set([Infinity, -Infinity]),
      bytes: new Uint8Array([9, 8, 7]),
      buffer: new Uint8Array([1, 2]).buffer,
      ints: new Int32Array([-1, 2 ** 30]),
      floats: new Float64Array([0.5, -0]),
      bigs: new BigUint64Array([2n ** 64n - 1n]),
      view: new DataView(new Uint8Array([4, 5]).buffer),
      re: /a.b/gi,
      err: new RangeError("boom"),
      sparse: [1, , 3],
      undef: undefined,
      dollar: { $date: "user data, not a tag", $x: 1 },
      boxed: Object(5),
      nested: [{ deep: [new Map([["k", new Date(1)]])] }],
    };
    await object.storage.put("s", value);
    const raw = await object.getRaw("s");
    assert.equal(raw!.contentType, STRUCTURED_CONTENT_TYPE);
    for (const got of [await object.storage.get("s"), (await object.storage.get(["s"])).get("s"), (await object.storage.list()).get("s")]) {
      assert.deepEqual(got, value);
      const g = got as typeof value;
      const third = [...g.map.values()][2] as unknown[];
      assert.ok(Object.is(third[1], -0));
      assert.ok(Object.is(g.floats[1], -0));
      assert.ok("undef" in g && g.undef === undefined);
      assert.ok(!(1 in g.sparse) && g.sparse.length === 3);
      assert.ok(g.err instanceof RangeError && g.err.message === "boom");
    }
    // deepEqual finds no two invalid Dates equal (their times are NaN).
    await object.storage.put("invalid", { d: new Date(NaN) });
    const invalid = (await object.storage.get<{ d: Date }>("invalid"))!.d;
    assert.ok(invalid instanceof Date && Number.isNaN(invalid.getTime()));
    // Top-level values of those types too.
    for (const top of [new Date(7), 12n, new Map([[1, 2]]), new Set(["a"]), NaN, -0, Infinity, new Float32Array([1.5])]) {
      await object.storage.put("top", top);
      const got = await object.storage.get("top");
      assert.deepEqual(got, top);
      if (typeof top === "number") assert.ok(Object.is(got, top));
    }
  });

  test("values that cannot be stored are refused at put(): functions, symbols, cycles", async () => {
    const { storage } = fresh();
    await assert.rejects(storage.put("f", () => 1), TypeError);
    await assert.rejects(storage.put("s", { s: Symbol("x") }), TypeError);
    const cyclic: Record<string, unknown> = {};
    cyclic.self = cyclic;
    await assert.rejects(storage.put("c", cyclic), TypeError);
  });

  test("values other clients stored: JSON parsed, text as strings, other types as bytes", async () => {
    const object = fresh();
    await object.putRaw("json", new TextEncoder().encode('{"from":"curl"}'), "application/json; charset=utf-8");
    await object.putRaw("text", new TextEncoder().encode("héllo"), "text/plain");
    await object.putRaw("png", new Uint8Array([137, 80, 78, 71]), "image/png");
    assert.deepEqual(await object.storage.get("json"), { from: "curl" });
    assert.equal(await object.storage.get("text"), "héllo");
    assert.deepEqual(await object.storage.get("png"), new Uint8Array([137, 80, 78, 71]));
    const all = await object.storage.list();
    assert.deepEqual(all.get("json"), { from: "curl" });
    assert.equal(all.get("text"), "héllo");
    assert.deepEqual(all.get("png"), new Uint8Array([137, 80, 78, 71]));
  });
});

describe("list", () => {
  const keys = ["a", "a/1", "a/2", "a/3", "ab", "b", "b/1", "c", "\ue000", "😀"];
  async function seeded() {
    const object = fresh();
    await object.storage.put(Object.fromEntries(keys.map((k, i) => [k, i])));
    return object.storage;
  }
  const listKeys = async (storage: Awaited<ReturnType<typeof seeded>>, options: Parameters<typeof storage.list>[0]) =>
    [...(await storage.list(options)).keys()];

  test("all keys, in UTF-8 byte order (an astral character after U+E000), values decoded", async () => {
    const storage = await seeded();
    const all = await storage.list();
    assert.deepEqual([...all.keys()], keys);
    assert.equal(all.get("b"), 5);
  });

  test("start, startAfter, end, prefix, reverse and limit, alone and together", async () => {
    const storage = await seeded();
    assert.deepEqual(await listKeys(storage, { start: "a/2" }), ["a/2", "a/3", "ab", "b", "b/1", "c", "\ue000", "😀"]);
    assert.deepEqual(await listKeys(storage, { startAfter: "a/2" }), ["a/3", "ab", "b", "b/1", "c", "\ue000", "😀"]);
    assert.deepEqual(await listKeys(storage, { end: "ab" }), ["a", "a/1", "a/2", "a/3"]);
    assert.deepEqual(await listKeys(storage, { prefix: "a/" }), ["a/1", "a/2", "a/3"]);
    assert.deepEqual(await listKeys(storage, { reverse: true }), [...keys].reverse());
    assert.deepEqual(await listKeys(storage, { limit: 2 }), ["a", "a/1"]);
    assert.deepEqual(await listKeys(storage, { reverse: true, limit: 2 }), ["😀", "\ue000"]);
    assert.deepEqual(await listKeys(storage, { prefix: "a", start: "a/2", end: "b", reverse: true, limit: 2 }), ["ab", "a/3"]);
    assert.deepEqual(await listKeys(storage, { prefix: "a", startAfter: "a/1", end: "ab", limit: 10 }), ["a/2", "a/3"]);
    assert.deepEqual(await listKeys(storage, { startAfter: "a", reverse: true, limit: 3 }), ["😀", "\ue000", "c"]);
    assert.deepEqual(await listKeys(storage, { start: "x", end: "a" }), []);
    assert.deepEqual(await listKeys(storage, { prefix: "zzz" }), []);
  });

  test("bad options are refused like Durable Objects refuses them", async () => {
    const storage = await seeded();
    await assert.rejects(storage.list({ start: "a", startAfter: "b" }), TypeError);
    await assert.rejects(storage.list({ limit: 0 }), RangeError);
    await assert.rejects(storage.list({ limit: 1.5 }), RangeError);
  });

  test("startAfter a key at the 2048-byte limit (no room for a successor key) still skips exactly that key", async () => {
    const { storage } = fresh();
    const longest = "m".repeat(2048);
    await storage.put({ [longest]: 1, ["m".repeat(2047) + "n"]: 2, l: 0 });
    assert.deepEqual([...(await storage.list({ startAfter: longest })).values()], [2]);
    assert.deepEqual([...(await storage.list({ startAfter: longest, reverse: true })).values()], [2]);
  });

  test("pages through the server's cursors: 2,500 keys in 1,000-key pages, and in 7-key pages with a limit", async () => {
    const object = fresh();
    const all = Array.from({ length: 2500 }, (_, i) => `k${String(i).padStart(5, "0")}`);
    for (let i = 0; i < all.length; i += 128) {
      await object.storage.put(Object.fromEntries(all.slice(i, i + 128).map((k) => [k, k])));
    }
    const listed = await object.storage.list();
    assert.deepEqual([...listed.keys()], all);
    assert.deepEqual([...(await object.storage.list({ reverse: true, start: "k00500", limit: 1500 })).keys()], all.slice(500).reverse().slice(0, 1500));
    const small = new Statehouse({ baseUrl: server.baseUrl, listPageSize: 7 }).object(object.ns, object.id);
    assert.deepEqual([...(await small.storage.list({ startAfter: "k00010", limit: 30 })).keys()], all.slice(11, 41));
    assert.deepEqual([...(await small.storage.list({ prefix: "k0001", reverse: true })).keys()], all.slice(10, 20).reverse());
  });
});

describe("deleteAll and sync", () => {
  test("deleteAll removes every key (and blob); sync resolves", async () => {
    const object = fresh();
    await object.storage.put({ a: 1, b: 2 });
    await object.blobs.put("f", new Uint8Array([1]));
    await object.storage.deleteAll();
    assert.equal((await object.storage.list()).size, 0);
    assert.equal(await object.blobs.head("f"), null);
    await object.storage.sync();
  });
});

describe("transaction", () => {
  test("reads see the transaction's own writes; the commit applies them atomically; the closure's value is returned", async () => {
    const object = fresh();
    await object.storage.put({ a: 1, b: 2, gone: 0 });
    const result = await object.storage.transaction(async (txn) => {
      assert.equal(await txn.get("a"), 1);
      await txn.put("a", 10);
      await txn.put({ c: 3 });
      assert.equal(await txn.delete("gone"), true);
      assert.equal(await txn.delete("never"), false);
      assert.equal(await txn.get("a"), 10);
      assert.equal(await txn.get("gone"), undefined);
      assert.deepEqual([...(await txn.get(["a", "b", "c", "gone"]))], [["a", 10], ["b", 2], ["c", 3]]);
      assert.deepEqual([...(await txn.list())], [["a", 10], ["b", 2], ["c", 3]]);
      assert.deepEqual([...(await txn.list({ reverse: true, limit: 2 }))], [["c", 3], ["b", 2]]);
      assert.equal(await txn.delete(["b", "c", "zz"]), 2);
      assert.deepEqual([...(await txn.list())], [["a", 10]]);
      // Nothing is visible outside before the commit.
      assert.equal(await object.storage.get("a"), 1);
      return "done";
    });
    assert.equal(result, "done");
    assert.deepEqual([...(await object.storage.list())], [["a", 10]]);
  });

  test("rollback() discards the writes; a throwing closure commits nothing and its error comes out", async () => {
    const object = fresh();
    await object.storage.put("k", 1);
    assert.equal(await object.storage.transaction(async (txn) => {
      await txn.put("k", 2);
      txn.rollback();
      return "rolled back";
    }), "rolled back");
    await assert.rejects(object.storage.transaction(async (txn) => {
      await txn.put("k", 3);
      throw new Error("closure failed");
    }), /closure failed/);
    assert.equal(await object.storage.get("k"), 1);
  });

  test("a concurrent write to a key the transaction read makes it run again on the new value: no lost update", async () => {
    const object = fresh();
    const other = client().object(object.ns, object.id);
    await object.storage.put("n", 1);
    let runs = 0;
    await object.storage.transaction(async (txn) => {
      runs++;
      const n = (await txn.get<number>("n"))!;
      if (runs === 1) await other.storage.put("n", 100);
      await txn.put("n", n + 1);
    });
    assert.equal(runs, 2);
    assert.equal(await object.storage.get("n"), 101);
  });

  test("a key read as absent that another client creates meanwhile is a conflict too, written or only read", async () => {
    const object = fresh();
    const other = client().object(object.ns, object.id);
    let runs = 0;
    await object.storage.transaction(async (txn) => {
      runs++;
      const seen = await txn.get(["flag", "created"]);
      if (runs === 1) await other.storage.put({ flag: "set", created: "by other" });
      await txn.put("result", seen.size);
      await txn.delete("created");
    });
    assert.equal(runs, 2);
    assert.deepEqual([...(await object.storage.list())], [["flag", "set"], ["result", 2]]);
  });

  test("a key only read (not written) is checked at commit, and its value is left as it was", async () => {
    const object = fresh();
    const other = client().object(object.ns, object.id);
    await object.storage.put({ price: 5, bytes: new Uint8Array([1, 2]), when: new Date(3) });
    let runs = 0;
    await object.storage.transaction(async (txn) => {
      runs++;
      const [price] = await Promise.all([txn.get<number>("price"), txn.get("bytes"), txn.list({ prefix: "when" })]);
      if (runs === 1) await other.storage.put("price", 7);
      await txn.put("total", price! * 2);
    });
    assert.equal(runs, 2);
    assert.equal(await object.storage.get("total"), 14);
    assert.deepEqual(await object.storage.get("bytes"), new Uint8Array([1, 2]));
    assert.deepEqual(await object.storage.get("when"), new Date(3));
  });

  test("a read-only transaction whose reads span requests is checked to be one state", async () => {
    const object = fresh();
    const other = client().object(object.ns, object.id);
    await object.storage.put({ a: 1, b: 1 });
    let runs = 0;
    const sum = await object.storage.transaction(async (txn) => {
      runs++;
      const a = (await txn.get<number>("a"))!;
      if (runs === 1) await other.storage.put({ a: 2, b: 2 });
      const b = (await txn.get<number>("b"))!;
      return a + b;
    });
    assert.equal(runs, 2);
    assert.equal(sum, 4);
    assert.equal((await object.info())!.version, 2, "a read-only transaction writes nothing");
  });

  test("a writer that always gets in between ends in TransactionConflictError after maxAttempts, having written nothing", async () => {
    const object = fresh();
    const other = client().object(object.ns, object.id);
    await object.storage.put("n", 0);
    let runs = 0;
    const failure = await object.storage
      .transaction(async (txn) => {
        runs++;
        const n = (await txn.get<number>("n"))!;
        await other.storage.put("n", n + 1000);
        await txn.put("n", -1);
      }, { maxAttempts: 3 })
      .then(() => assert.fail("expected a conflict"), (err: unknown) => err);
    assert.ok(failure instanceof TransactionConflictError);
    assert.ok(failure instanceof StatehouseError);
    assert.equal(failure.attempts, 3);
    assert.equal(failure.status, 412);
    assert.equal(failure.kind, "precondition-failed");
    assert.equal(failure.key, "n");
    assert.equal(runs, 3);
    assert.equal(await object.storage.get("n"), 3000);
  });

  test("the txn cannot be used after its transaction ended", async () => {
    const object = fresh();
    let kept: { get(key: string): Promise<unknown> } | undefined;
    await object.storage.transaction(async (txn) => {
      kept = txn;
    });
    await assert.rejects(kept!.get("a"), /transaction has ended/);
  });

  test("more than 128 ops in one commit is refused before anything is sent", async () => {
    const object = fresh();
    await assert.rejects(
      object.storage.transaction(async (txn) => {
        for (let i = 0; i < 129; i++) await txn.put(`k${i}`, i);
      }),
      /more than the server's 128/,
    );
    assert.equal(await object.info(), null);
  });
});
