// Ten callers increment one counter through transaction() at the same time:
// every increment must land exactly once, whatever the conflicts. A caller
// whose transaction gives up (TransactionConflictError: nothing of it was
// written) tries that increment again, as an application would; the count of
// those is printed, and the final value proves none was lost or doubled.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Statehouse, TransactionConflictError } from "../src/index.js";
import { serverForFile, uniqueName } from "./support.js";

const server = serverForFile();

test("a counter incremented 1,000 times by 10 concurrent transaction() callers ends at exactly 1,000", { timeout: 300_000 }, async () => {
  const callers = 10;
  const each = 100;
  const ns = uniqueName("counter");
  let attempts = 0;
  let gaveUp = 0;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: callers }, async () => {
      // A client of its own per caller, as separate processes would have.
      const storage = new Statehouse({ baseUrl: server.baseUrl }).object(ns, "counter").storage;
      for (let i = 0; i < each; i++) {
        for (;;) {
          try {
            await storage.transaction(async (txn) => {
              attempts++;
              const value = (await txn.get<number>("value")) ?? 0;
              await txn.put("value", value + 1);
            });
            break;
          } catch (err) {
            if (!(err instanceof TransactionConflictError)) throw err;
            gaveUp++;
          }
        }
      }
    }),
  );
  const seconds = (performance.now() - started) / 1000;
  const storage = new Statehouse({ baseUrl: server.baseUrl }).object(ns, "counter").storage;
  const committed = callers * each;
  assert.equal(await storage.get("value"), committed);
  // Every increment is one version of the object: none was applied twice, none lost.
  assert.equal((await storage.object.info())!.version, committed);
  console.log(
    `counter: ${committed} transactions by ${callers} concurrent callers in ${seconds.toFixed(2)} s: ` +
      `${(committed / seconds).toFixed(0)} transactions/s; ${attempts} attempts (${(attempts / committed).toFixed(2)} per commit), ` +
      `${gaveUp} gave up after 10 conflicts and were run again`,
  );
});
