// A chat room's message history, stored the way Cloudflare's chat demo
// (linked from the Durable Objects documentation) stores it: each message
// under the ISO time it was sent, times kept strictly increasing so that keys
// sort in the order messages arrived, and the backlog a newcomer sees read
// with list({ reverse: true, limit: 100 }) and put back in order. The demo
// speaks WebSockets; this class keeps its storage logic behind two HTTP
// routes, written against the Durable Objects API only, so it runs on
// Cloudflare as it is and on Node through ./adapter.ts.
import { DurableObject } from "cloudflare:workers";

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    const match = url.pathname.match(/^\/rooms\/([^/]+)\/messages$/);
    if (!match) return new Response("Not found", { status: 404 });
    const room = env.ROOMS.getByName(decodeURIComponent(match[1]));
    return room.fetch(request);
  },
};

export class ChatRoom extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    // The latest time handed out, so that two messages in one millisecond still get distinct keys.
    this.lastTimestamp = 0;
  }

  async fetch(request) {
    if (request.method === "POST") {
      const data = await request.json();
      if (typeof data.name !== "string" || typeof data.message !== "string") {
        return new Response("Expected {name, message}", { status: 400 });
      }
      if (data.message.length > 256) {
        return new Response("Message too long.", { status: 400 });
      }
      const timestamp = Math.max(Date.now(), this.lastTimestamp + 1);
      this.lastTimestamp = timestamp;
      const message = JSON.stringify({ name: data.name, message: data.message, timestamp });
      const key = new Date(timestamp).toISOString();
      await this.ctx.storage.put(key, message);
      return new Response(message, { headers: { "content-type": "application/json" } });
    }
    if (request.method === "GET") {
      // The last 100 messages, oldest first.
      const storage = await this.ctx.storage.list({ reverse: true, limit: 100 });
      const backlog = [...storage.values()];
      backlog.reverse();
      return new Response(`[${backlog.join(",")}]`, { headers: { "content-type": "application/json" } });
    }
    return new Response("Method not allowed", { status: 405 });
  }
}
