// A Node module hook (module.register) that resolves the Workers runtime's
// `cloudflare:workers` specifier to ./cloudflare-workers.mjs, so Durable
// Object classes written for Cloudflare import it unchanged.
export async function resolve(specifier, context, nextResolve) {
  if (specifier === "cloudflare:workers") {
    return { url: new URL("./cloudflare-workers.mjs", import.meta.url).href, shortCircuit: true };
  }
  return nextResolve(specifier, context);
}
