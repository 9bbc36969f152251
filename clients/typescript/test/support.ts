// Shared by the test files: the real server binary (STATEHOUSE_BIN) on a free
// port, unique names, a seeded PRNG, and bearer tokens made by the binary.
import { execFileSync } from "node:child_process";
import { after, before } from "node:test";
import { startServer, statehouseBin } from "../scripts/server.mjs";

export interface RunningServer {
  baseUrl: string;
  port: number;
  instance: string;
  logs: string[];
  dataDir: string;
  stop: () => Promise<void>;
}

/**
 * Starts one server for the test file (before its first test, stopped after
 * its last). The returned object is filled in once `before` has run.
 */
export function serverForFile(env: Record<string, string> = {}): RunningServer {
  const handle = {} as RunningServer;
  before(async () => {
    Object.assign(handle, await startServer({ env }));
  });
  after(async () => {
    await handle.stop?.();
  });
  return handle;
}

let counter = 0;
/** A namespace name no other test uses. */
export function uniqueName(label: string): string {
  counter++;
  return `${label}-${process.pid}-${Date.now().toString(36)}-${counter}`;
}

/** mulberry32: small, fast and good enough to drive a random test from a printed seed. */
export function prng(seed: number): {
  next(): number;
  int(n: number): number;
  pick<T>(items: readonly T[]): T;
  chance(p: number): boolean;
} {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    next,
    int: (n) => Math.floor(next() * n),
    pick: (items) => items[Math.floor(next() * items.length)]!,
    chance: (p) => next() < p,
  };
}

/** A bearer token and its STATEHOUSE_AUTH_TOKENS line, made by the binary itself (`statehouse token`). */
export function makeToken(name: string, namespaces: string, rights: string): { token: string; line: string } {
  const out = execFileSync(statehouseBin(), ["token", "--name", name, "--namespaces", namespaces, "--rights", rights], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  const token = out.match(/^token:\s*(\S+)/m)?.[1];
  const line = out.match(/^line:\s*(.+)$/m)?.[1]?.trim();
  if (!token || !line) throw new Error(`unexpected output of statehouse token:\n${out}`);
  return { token, line };
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
