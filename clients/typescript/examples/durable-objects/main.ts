// Runs Cloudflare's counter example and the chat room on Node against a
// Statehouse server at STATEHOUSE_URL, printing what each request answers:
//   STATEHOUSE_URL=http://127.0.0.1:8080 node .build/examples/durable-objects/main.js
import { Statehouse } from "../../src/index.js";
import { loadWorker } from "./adapter.js";

const client = new Statehouse({ baseUrl: process.env.STATEHOUSE_URL ?? "http://127.0.0.1:8080", token: process.env.STATEHOUSE_TOKEN });

const counter = await loadWorker(new URL("./counter.js", import.meta.url), { client, bindings: { COUNTERS: "Counter" } });
for (const path of ["/?name=A", "/increment?name=A", "/increment?name=A", "/decrement?name=A", "/?name=B"]) {
  const response = await counter.fetch(new Request(`http://example.com${path}`));
  console.log(`GET ${path} -> ${response.status} ${await response.text()}`);
}

const chat = await loadWorker(new URL("./chat-room.js", import.meta.url), { client, bindings: { ROOMS: "ChatRoom" } });
for (const [name, message] of [["alice", "hello"], ["bob", "hi alice"]]) {
  await chat.fetch(new Request("http://example.com/rooms/lobby/messages", { method: "POST", body: JSON.stringify({ name, message }) }));
}
const history = await chat.fetch(new Request("http://example.com/rooms/lobby/messages"));
console.log(`GET /rooms/lobby/messages -> ${await history.text()}`);
