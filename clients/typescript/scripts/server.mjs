// Starts the real statehouse binary the way the Rust tests do: a fresh data
// folder as its working directory (so the defaults, file:./data/statehouse.db
// and ./data/objects, land there), a free loopback port, JSON logs. The server
// writes its logs to stderr; stdout is read too so that a build that moves them
// still starts.
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, existsSync, statSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

/** The binary named by STATEHOUSE_BIN; throws (never skips) when it is unset or missing. */
export function statehouseBin() {
  const bin = process.env.STATEHOUSE_BIN;
  if (!bin) {
    throw new Error(
      "STATEHOUSE_BIN is not set: point it at a statehouse server binary, e.g. " +
        "STATEHOUSE_BIN=$PWD/target/debug/statehouse (cargo build or cargo test builds it)",
    );
  }
  if (!existsSync(bin) || !statSync(bin).isFile()) {
    throw new Error(`STATEHOUSE_BIN=${bin} does not exist or is not a file`);
  }
  return bin;
}

/** A port nothing listens on right now (the server binds it a moment later). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.unref();
    probe.on("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

/**
 * Starts the server and resolves once it logs `listening`.
 * @param {{ env?: Record<string, string>, startTimeoutMs?: number }} [options]
 * @returns {Promise<{ baseUrl: string, port: number, instance: string, logs: string[], dataDir: string, stop: () => Promise<void> }>}
 */
export async function startServer(options = {}) {
  const bin = statehouseBin();
  const dataDir = mkdtempSync(join(tmpdir(), "statehouse-ts-"));
  // A port taken between the probe and the bind makes the server exit: try a few.
  let lastError;
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = await freePort();
    try {
      return await launch(bin, dataDir, port, options);
    } catch (err) {
      lastError = err;
    }
  }
  rmSync(dataDir, { recursive: true, force: true });
  throw lastError;
}

// Servers still running when this process exits (a crashed test run skips its
// after-hooks) are killed with it rather than left listening.
const running = new Set();
process.on("exit", () => {
  for (const child of running) child.kill("SIGKILL");
});

function launch(bin, dataDir, port, options) {
  const env = {
    PATH: process.env.PATH ?? "",
    STATEHOUSE_LISTEN: `127.0.0.1:${port}`,
    STATEHOUSE_LOG_FORMAT: "json",
    STATEHOUSE_LOG: "info,tower_http=warn",
    ...options.env,
  };
  const child = spawn(bin, [], { cwd: dataDir, env, stdio: ["ignore", "pipe", "pipe"] });
  running.add(child);
  child.once("exit", () => running.delete(child));
  const logs = [];
  return new Promise((resolve, reject) => {
    let settled = false;
    const timer = setTimeout(() => {
      fail(new Error(`statehouse did not log "listening" within ${options.startTimeoutMs ?? 60000} ms; its log:\n${logs.join("\n")}`));
      child.kill("SIGKILL");
    }, options.startTimeoutMs ?? 60000);
    const fail = (err) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      reject(err);
    };
    const onLine = (line) => {
      logs.push(line);
      if (logs.length > 2000) logs.splice(0, logs.length - 2000);
      let event;
      try {
        event = JSON.parse(line);
      } catch {
        return;
      }
      if (event.message === "listening" && !settled) {
        settled = true;
        clearTimeout(timer);
        const addr = String(event.addr ?? `127.0.0.1:${port}`);
        resolve({
          baseUrl: `http://${addr}`,
          port: Number(addr.split(":").pop()),
          instance: String(event.instance ?? ""),
          logs,
          dataDir,
          stop: () => stop(child, dataDir),
        });
      }
    };
    createInterface({ input: child.stdout }).on("line", onLine);
    createInterface({ input: child.stderr }).on("line", onLine);
    child.on("error", (err) => fail(new Error(`could not start ${bin}: ${err.message}`)));
    child.on("exit", (code, signal) =>
      fail(new Error(`statehouse exited (code ${code}, signal ${signal}) before listening; its log:\n${logs.join("\n")}`)),
    );
  });
}

async function stop(child, dataDir) {
  if (child.exitCode === null && child.signalCode === null) {
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), 10000);
    await exited;
    clearTimeout(timer);
  }
  rmSync(dataDir, { recursive: true, force: true });
}
