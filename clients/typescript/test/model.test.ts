// Random operations through `storage`, each checked against an in-memory Map.
// Transactions run a random script of reads and writes on both the txn and a
// copy of the model taken when the attempt starts; some have another client
// write a key the transaction already read, between that read and the
// commit. That write goes into the model at once; the transaction must then
// run again on the new state (its final attempt's copy becomes the model), so
// a lost update shows up as a mismatch in the next full comparison.
//
// STATEHOUSE_MODEL_SEED replays a run; STATEHOUSE_MODEL_OPS changes its length.
import assert from "node:assert/strict";
import { randomInt } from "node:crypto";
import { test } from "node:test";
import { Statehouse, compareKeys, type StatehouseTransaction, type StorageListOptions, type StorageOperations } from "../src/index.js";
import { prng, serverForFile, uniqueName } from "./support.js";

const server = serverForFile();

const KEYS = [
  "a", "a/1", "a/2", "a/10", "ab", "b", "b/x", "c", "k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9",
  ".", "..", "é", "😀", "\ue000", "sp ace", "100%", "z", "zz/ü",
];
const BOUNDS = [...KEYS, "", "a/", "k", "k5x", "y", "\uffff", "😀😀"];
const PREFIXES = ["", "a", "a/", "b", "k", "k1", "z", "é", "q", "😀"];

type Rng = ReturnType<typeof prng>;

function randomValue(r: Rng, depth = 0): unknown {
  switch (r.int(depth > 1 ? 6 : 13)) {
    case 0: return r.int(1000) - 500;
    case 1: return r.next() * 1e6;
    case 2: return `s${r.int(100)}-é😀`;
    case 3: return r.chance(0.5);
    case 4: return null;
    case 5: return "";
    case 6: return Array.from({ length: r.int(4) }, () => randomValue(r, depth + 1));
    case 7: return Object.fromEntries(Array.from({ length: r.int(4) }, (_, i) => [`f${i}`, randomValue(r, depth + 1)]));
    case 8: return new Date(1_700_000_000_000 + r.int(1e9));
    case 9: return new Map([[`m${r.int(9)}`, randomValue(r, depth + 1)]]);
    case 10: return Uint8Array.from({ length: r.int(6) }, () => r.int(256));
    case 11: return BigInt(r.int(1e9)) * 10n ** 12n;
    default: return { when: new Date(r.int(1e12)), tags: new Set([r.int(5), "x"]), n: r.int(9) };
  }
}

function modelList(model: Map<string, unknown>, o: StorageListOptions): [string, unknown][] {
  let keys = [...model.keys()].sort(compareKeys).filter(
    (k) =>
      (o.prefix === undefined || k.startsWith(o.prefix)) &&
      (o.start === undefined || compareKeys(k, o.start) >= 0) &&
      (o.startAfter === undefined || compareKeys(k, o.startAfter) > 0) &&
      (o.end === undefined || compareKeys(k, o.end) < 0),
  );
  if (o.reverse) keys = keys.reverse();
  if (o.limit !== undefined) keys = keys.slice(0, o.limit);
  return keys.map((k) => [k, model.get(k)]);
}

function randomListOptions(r: Rng): StorageListOptions {
  const o: StorageListOptions = {};
  if (r.chance(0.3)) o.start = r.pick(BOUNDS);
  else if (r.chance(0.3)) o.startAfter = r.pick(BOUNDS);
  if (r.chance(0.3)) o.end = r.pick(BOUNDS);
  if (r.chance(0.35)) o.prefix = r.pick(PREFIXES);
  if (r.chance(0.4)) o.reverse = true;
  if (r.chance(0.5)) o.limit = 1 + r.int(8);
  return o;
}

function pickKeys(r: Rng, most: number): string[] {
  return [...new Set(Array.from({ length: 1 + r.int(most) }, () => r.pick(KEYS)))];
}

const sortedEntries = (m: Map<string, unknown>) => [...m].sort(([a], [b]) => compareKeys(a, b));

test("2,000 random operations through storage match an in-memory Map model", { timeout: 600_000 }, async () => {
  const seed = Number(process.env.STATEHOUSE_MODEL_SEED ?? randomInt(2 ** 31));
  const total = Number(process.env.STATEHOUSE_MODEL_OPS ?? 2000);
  console.log(`model test: seed ${seed} (replay with STATEHOUSE_MODEL_SEED=${seed}), ${total} operations`);
  const rng = prng(seed);
  const ns = uniqueName("model");
  // Small pages on one client make list() page through the server's cursors.
  const paged = new Statehouse({ baseUrl: server.baseUrl, listPageSize: 3 }).object(ns, "obj").storage;
  const whole = new Statehouse({ baseUrl: server.baseUrl }).object(ns, "obj").storage;
  const writer = new Statehouse({ baseUrl: server.baseUrl }).object(ns, "obj").storage;
  const model = new Map<string, unknown>();
  const counts: Record<string, number> = {};
  const tally = { attempts: 0, injected: 0, rerunAfterInjection: 0, rolledBack: 0, txnOps: 0 };
  const count = (name: string) => (counts[name] = (counts[name] ?? 0) + 1);

  const kinds: [string, number][] = [
    ["get", 12], ["getMany", 7], ["put", 12], ["putMany", 7], ["delete", 7], ["deleteMany", 5],
    ["list", 14], ["transaction", 14], ["transactionWithWriter", 12], ["deleteAll", 1],
  ];
  const weight = kinds.reduce((s, [, w]) => s + w, 0);

  for (let i = 0; i < total; i++) {
    let roll = rng.int(weight);
    const kind = kinds.find(([, w]) => (roll -= w) < 0)![0];
    count(kind);
    const storage = rng.chance(0.5) ? paged : whole;
    const where = `op ${i} (${kind}, seed ${seed})`;
    switch (kind) {
      case "get": {
        const key = rng.pick(KEYS);
        assert.deepEqual(await storage.get(key), model.get(key), where);
        break;
      }
      case "getMany": {
        const keys = pickKeys(rng, 6);
        const want = sortedEntries(new Map(keys.filter((k) => model.has(k)).map((k) => [k, model.get(k)])));
        assert.deepEqual([...(await storage.get(keys))], want, where);
        break;
      }
      case "put": {
        const key = rng.pick(KEYS);
        const value = randomValue(rng);
        await storage.put(key, value);
        model.set(key, value);
        break;
      }
      case "putMany": {
        const entries = Object.fromEntries(pickKeys(rng, 6).map((k) => [k, randomValue(rng)]));
        await storage.put(entries);
        for (const [k, v] of Object.entries(entries)) model.set(k, v);
        break;
      }
      case "delete": {
        const key = rng.pick(KEYS);
        assert.equal(await storage.delete(key), model.delete(key), where);
        break;
      }
      case "deleteMany": {
        const keys = pickKeys(rng, 6);
        const existed = keys.filter((k) => model.delete(k)).length;
        assert.equal(await storage.delete(keys), existed, where);
        break;
      }
      case "list": {
        const options = randomListOptions(rng);
        assert.deepEqual([...(await storage.list(options))], modelList(model, options), `${where} ${JSON.stringify(options)}`);
        break;
      }
      case "deleteAll": {
        await storage.deleteAll();
        model.clear();
        break;
      }
      case "transaction":
      case "transactionWithWriter": {
        const script = rng.int(2 ** 31);
        const withWriter = kind === "transactionWithWriter";
        let attempts = 0;
        let view = new Map<string, unknown>();
        let injectedChange = false;
        let wrote = false;
        let rolledBack = false;
        await storage.transaction(async (txn) => {
          attempts++;
          tally.attempts++;
          view = new Map(model);
          wrote = false;
          rolledBack = false;
          // The same choices on every attempt; only what the reads find may differ.
          const r = prng(script);
          const read = new ReadKeys();
          const steps = 1 + r.int(6);
          for (let s = 0; s < steps; s++) {
            tally.txnOps++;
            const at = `${where}, attempt ${attempts}, step ${s}`;
            await transactionStep(r, txn, view, read, at, () => (wrote = true));
            if (withWriter && attempts === 1 && !injectedChange && read.size > 0 && r.chance(0.6)) {
              // Another client changes a key this attempt has read, before it commits.
              const key = r.pick(read.list());
              if (model.has(key) && r.chance(0.5)) {
                await writer.delete(key);
                model.delete(key);
              } else {
                const value = randomValue(r);
                await writer.put(key, value);
                model.set(key, value);
              }
              injectedChange = true;
              tally.injected++;
            }
          }
          if (r.chance(0.08)) {
            txn.rollback();
            rolledBack = true;
          }
        });
        // A transaction that changed nothing (only deleted keys it found absent) may come before
        // the injected write in the order of commits; one that changed something must come after.
        if (rolledBack) tally.rolledBack++;
        else if (wrote) {
          model.clear();
          view.forEach((v, k) => model.set(k, v));
        }
        if (injectedChange && wrote && !rolledBack) {
          assert.ok(attempts >= 2, `${where}: a key it read was changed before its commit, yet the first attempt committed`);
        }
        if (injectedChange && attempts >= 2) tally.rerunAfterInjection++;
        break;
      }
    }
    if (i % 200 === 199 || i === total - 1) {
      assert.deepEqual([...(await whole.list())], sortedEntries(model), `full comparison after op ${i} (seed ${seed})`);
    }
  }
  const info = await new Statehouse({ baseUrl: server.baseUrl }).object(ns, "obj").info();
  assert.equal(info?.keys ?? 0, model.size);
  console.log(`model test: seed ${seed}; operations ${JSON.stringify(counts)}`);
  console.log(
    `model test: ${counts.transaction ?? 0} + ${counts.transactionWithWriter ?? 0} transactions, ${tally.txnOps} steps inside them, ` +
      `${tally.attempts} attempts, ${tally.injected} concurrent writes injected, ${tally.rerunAfterInjection} transactions ran again after one, ` +
      `${tally.rolledBack} rolled back; ${model.size} keys at the end`,
  );
});

/**
 * The keys an attempt read from the server: touched first by a read, not
 * after its own write (a key it wrote first it never read, and may be
 * overwritten by others without a conflict: its write comes later).
 */
class ReadKeys {
  private readonly fromServer = new Set<string>();
  private readonly own = new Set<string>();
  add(key: string): void {
    if (!this.own.has(key)) this.fromServer.add(key);
  }
  written(key: string): void {
    this.own.add(key);
  }
  get size(): number {
    return this.fromServer.size;
  }
  list(): string[] {
    return [...this.fromServer];
  }
}

/** One random step of a transaction, on the txn and on the model copy, results compared. */
async function transactionStep(
  r: Rng,
  txn: StatehouseTransaction,
  view: Map<string, unknown>,
  read: ReadKeys,
  at: string,
  /** Called when the step changed the state (a put, or a delete of a key that existed). */
  wrote: () => void,
): Promise<void> {
  const t: StorageOperations = txn;
  switch (r.int(8)) {
    case 0: {
      const key = r.pick(KEYS);
      read.add(key);
      assert.deepEqual(await t.get(key), view.get(key), at);
      return;
    }
    case 1: {
      const keys = pickKeys(r, 5);
      keys.forEach((k) => read.add(k));
      const want = sortedEntries(new Map(keys.filter((k) => view.has(k)).map((k) => [k, view.get(k)])));
      assert.deepEqual([...(await t.get(keys))], want, at);
      return;
    }
    case 2: {
      const options = randomListOptions(r);
      const got = [...(await t.list(options))];
      got.forEach(([k]) => read.add(k));
      assert.deepEqual(got, modelList(view, options), `${at} ${JSON.stringify(options)}`);
      return;
    }
    case 3:
    case 4: {
      const key = r.pick(KEYS);
      const value = randomValue(r);
      await t.put(key, value);
      read.written(key);
      view.set(key, value);
      wrote();
      return;
    }
    case 5: {
      const entries = Object.fromEntries(pickKeys(r, 4).map((k) => [k, randomValue(r)]));
      await t.put(entries);
      for (const [k, v] of Object.entries(entries)) view.set(k, v), read.written(k);
      wrote();
      return;
    }
    case 6: {
      const key = r.pick(KEYS);
      read.add(key);
      read.written(key);
      const existed = view.delete(key);
      assert.equal(await t.delete(key), existed, at);
      if (existed) wrote();
      return;
    }
    default: {
      const keys = pickKeys(r, 4);
      keys.forEach((k) => (read.add(k), read.written(k)));
      const existed = keys.filter((k) => view.delete(k)).length;
      assert.equal(await t.delete(keys), existed, at);
      if (existed > 0) wrote();
    }
  }
}
