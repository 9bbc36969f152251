// A plain Node HTTP server whose routes keep their state in Statehouse: a
// shopping cart per user. Run it with a server at STATEHOUSE_URL:
//   STATEHOUSE_URL=http://127.0.0.1:8080 PORT=3000 node .build/examples/http-server.js
//   curl -X POST localhost:3000/carts/user-42/items -d '{"item":"apple"}'
//   curl localhost:3000/carts/user-42
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { pathToFileURL } from "node:url";
import { Statehouse, StatehouseError } from "../src/index.js";

export function cartServer(client: Statehouse): Server {
  return createServer((req, res) => {
    route(client, req, res).catch((err: unknown) => {
      // A problem from Statehouse keeps its status; anything else is ours.
      const status = err instanceof StatehouseError ? err.status : 500;
      send(res, status, { error: err instanceof Error ? err.message : String(err) });
    });
  });
}

async function route(client: Statehouse, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const url = new URL(req.url ?? "/", "http://localhost");
  const match = url.pathname.match(/^\/carts\/([A-Za-z0-9._~-]{1,256})(\/items)?$/);
  if (!match) return send(res, 404, { error: "not found" });
  const cart = client.object("carts", match[1]!);

  if (req.method === "GET" && !match[2]) {
    const items = (await cart.storage.get<string[]>("items")) ?? [];
    return send(res, 200, { items });
  }
  if (req.method === "POST" && match[2]) {
    const body = JSON.parse((await readBody(req)) || "{}") as { item?: unknown };
    if (typeof body.item !== "string" || body.item === "") return send(res, 400, { error: "expected {\"item\": \"...\"}" });
    const item = body.item;
    // Read-modify-write of the list: a transaction, so concurrent adds from any number of servers all land.
    const items = await cart.storage.transaction(async (txn) => {
      const items = [...((await txn.get<string[]>("items")) ?? []), item];
      await txn.put("items", items);
      return items;
    });
    await cart.emit("ItemAdded", { item });
    return send(res, 201, { items });
  }
  if (req.method === "DELETE" && !match[2]) {
    await cart.storage.deleteAll();
    return send(res, 204, undefined);
  }
  return send(res, 405, { error: "method not allowed" });
}

function send(res: ServerResponse, status: number, body: unknown): void {
  if (body === undefined) {
    res.writeHead(status).end();
    return;
  }
  res.writeHead(status, { "content-type": "application/json" }).end(JSON.stringify(body));
}

async function readBody(req: IncomingMessage): Promise<string> {
  let text = "";
  for await (const chunk of req) text += chunk;
  return text;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const client = new Statehouse({ baseUrl: process.env.STATEHOUSE_URL ?? "http://127.0.0.1:8080", token: process.env.STATEHOUSE_TOKEN });
  const port = Number(process.env.PORT ?? 3000);
  cartServer(client).listen(port, "127.0.0.1", () => console.log(`carts on http://127.0.0.1:${port}`));
}
