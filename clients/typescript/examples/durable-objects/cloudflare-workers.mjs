// What `import { DurableObject } from "cloudflare:workers"` gives a Durable
// Object class on Node: the base class that keeps `ctx` and `env`, as the
// Workers runtime's does. ./adapter.ts maps the specifier here.
export class DurableObject {
  constructor(ctx, env) {
    this.ctx = ctx;
    this.env = env;
  }
}

export class WorkerEntrypoint {
  constructor(ctx, env) {
    this.ctx = ctx;
    this.env = env;
  }
}
