// Runs a Worker module with Durable Object classes, written for Cloudflare,
// unchanged on Node: each class gets `ctx.storage` backed by a Statehouse
// object, and `env.<BINDING>` namespaces whose stubs call the class's
// methods (RPC) or its `fetch`.
//
// Durable Objects' input gate lets one event at a time into an object, so a
// read-modify-write in a method is safe. Here:
//   - "gate" (default): calls to one object from this process run one after
//     another, which is that guarantee for a single process;
//   - "transaction": each call also runs inside storage.transaction(), so it
//     holds across processes too (a conflicting call runs again; methods must
//     then have no side effects other than storage).
import { AsyncLocalStorage } from "node:async_hooks";
import { createHash, randomUUID } from "node:crypto";
import { register } from "node:module";
import { Statehouse, type StatehouseStorage, type StatehouseTransaction, type StorageOperations } from "../../src/index.js";

export type GateMode = "gate" | "transaction";

export interface AdapterOptions {
  client: Statehouse;
  /** Binding name -> exported class name, e.g. { COUNTERS: "Counter" }. */
  bindings: Record<string, string>;
  /** The Statehouse namespace of each binding's objects. Default: the binding name in lower case. */
  namespaces?: Record<string, string>;
  mode?: GateMode;
}

export interface LoadedWorker {
  /** The module's `export default { fetch }`, called with the env the adapter built. */
  fetch(request: Request): Promise<Response>;
  env: Record<string, DurableObjectNamespaceLike>;
}

export interface DurableObjectId {
  readonly name: string | undefined;
  toString(): string;
  equals(other: DurableObjectId): boolean;
}

export interface DurableObjectNamespaceLike {
  idFromName(name: string): DurableObjectId;
  newUniqueId(): DurableObjectId;
  idFromString(id: string): DurableObjectId;
  get(id: DurableObjectId): Record<string, (...args: unknown[]) => Promise<unknown>>;
  getByName(name: string): Record<string, (...args: unknown[]) => Promise<unknown>>;
}

let hooksRegistered = false;

/** Imports a Worker module (a path or file URL) and wires its Durable Object bindings to Statehouse. */
export async function loadWorker(module: string | URL, options: AdapterOptions): Promise<LoadedWorker> {
  if (!hooksRegistered) {
    register("./cloudflare-workers-hooks.mjs", import.meta.url);
    hooksRegistered = true;
  }
  const exports = (await import(module.toString())) as Record<string, unknown> & { default?: { fetch?: Function } };
  const env: Record<string, DurableObjectNamespaceLike> = {};
  for (const [binding, className] of Object.entries(options.bindings)) {
    const Class = exports[className];
    if (typeof Class !== "function") throw new Error(`${module} exports no class ${className} for binding ${binding}`);
    const ns = options.namespaces?.[binding] ?? binding.toLowerCase().replace(/[^a-z0-9._-]/g, "-");
    env[binding] = new Namespace(options.client, ns, Class as new (ctx: unknown, env: unknown) => object, env, options.mode ?? "gate");
  }
  const handler = exports.default;
  return {
    env,
    async fetch(request: Request) {
      if (typeof handler?.fetch !== "function") throw new Error(`${module} has no default export with fetch()`);
      return handler.fetch(request, env, { waitUntil() {}, passThroughOnException() {} });
    },
  };
}

class Id implements DurableObjectId {
  constructor(
    readonly id: string,
    readonly name: string | undefined,
  ) {}
  toString(): string {
    return this.id;
  }
  equals(other: DurableObjectId): boolean {
    return other.toString() === this.id;
  }
}

/** A live object: its instance, and the chain its calls wait on. */
interface Live {
  instance: Record<string, unknown>;
  gate: Promise<unknown>;
}

class Namespace implements DurableObjectNamespaceLike {
  private readonly live = new Map<string, Live>();

  constructor(
    private readonly client: Statehouse,
    private readonly ns: string,
    private readonly Class: new (ctx: unknown, env: unknown) => object,
    private readonly env: unknown,
    private readonly mode: GateMode,
  ) {}

  idFromName(name: string): DurableObjectId {
    // Readable names are kept as object ids; others become a hash, as Cloudflare's ids are.
    const plain = /^[A-Za-z0-9._~-]{1,200}$/.test(name) && name !== "." && name !== "..";
    return new Id(plain ? name : createHash("sha256").update(name).digest("hex"), name);
  }

  newUniqueId(): DurableObjectId {
    return new Id(randomUUID().replace(/-/g, ""), undefined);
  }

  idFromString(id: string): DurableObjectId {
    return new Id(id, undefined);
  }

  getByName(name: string) {
    return this.get(this.idFromName(name));
  }

  get(id: DurableObjectId) {
    const key = id.toString();
    const call = (method: string, args: unknown[]) => this.call(key, id, method, args);
    // A stub: any property is a method that runs on the object, through the gate.
    return new Proxy({} as Record<string, (...args: unknown[]) => Promise<unknown>>, {
      get: (_target, property) => {
        if (typeof property !== "string" || property === "then") return undefined;
        if (property === "id") return id;
        if (property === "name") return id.name;
        return (...args: unknown[]) => call(property, args);
      },
    });
  }

  private call(key: string, id: DurableObjectId, method: string, args: unknown[]): Promise<unknown> {
    const live = this.instance(key, id);
    const run = async () => {
      const fn = live.instance[method];
      if (typeof fn !== "function") throw new TypeError(`the Durable Object has no method ${method}()`);
      if (this.mode === "gate") return fn.apply(live.instance, args);
      const storage = this.client.object(this.ns, key).storage;
      // On Cloudflare a call never fails for contention; here it waits its turn through retries.
      return storage.transaction((txn) => current.run(txn, () => fn.apply(live.instance, args)), { maxAttempts: 100 });
    };
    const result = live.gate.then(run, run);
    live.gate = result.catch(() => undefined);
    return result;
  }

  private instance(key: string, id: DurableObjectId): Live {
    let live = this.live.get(key);
    if (live) return live;
    const storage = storageFor(this.client.object(this.ns, key).storage);
    const made: Live = { instance: {}, gate: Promise.resolve() };
    const ctx = {
      id,
      storage,
      // Runs before any call that arrives after it, as the input gate does.
      blockConcurrencyWhile<T>(fn: () => Promise<T>): Promise<T> {
        const result = made.gate.then(fn);
        made.gate = result.catch(() => undefined);
        return result;
      },
      waitUntil(_promise: Promise<unknown>) {},
    };
    this.live.set(key, made);
    made.instance = new this.Class(ctx, this.env) as Record<string, unknown>;
    return made;
  }
}

/** The transaction a "transaction"-mode call runs in, for ctx.storage to route to. */
const current = new AsyncLocalStorage<StatehouseTransaction>();

/** ctx.storage: the object's storage, or, inside a transaction-mode call, that call's transaction. */
function storageFor(storage: StatehouseStorage): StatehouseStorage {
  const routed = (name: keyof StorageOperations) =>
    (...args: unknown[]) => {
      const txn = current.getStore();
      const target = (txn ?? storage) as unknown as Record<string, (...a: unknown[]) => unknown>;
      return target[name]!(...args);
    };
  return new Proxy(storage, {
    get(target, property, receiver) {
      if (property === "get" || property === "put" || property === "delete" || property === "list") return routed(property);
      return Reflect.get(target, property, receiver);
    },
  });
}
