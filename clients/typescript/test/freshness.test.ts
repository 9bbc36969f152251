// The generated types must be what the running server's OpenAPI document
// generates today: a server change that is not regenerated here (npm run
// generate) fails this file. And the whole package type-checks (strict).
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";
import { DOCUMENT_PATH, ROOT, TYPES_PATH, fetchDocument, render } from "../scripts/generate.mjs";
import { serverForFile } from "./support.js";

const server = serverForFile();
const REGENERATE = "the server's /openapi.json changed: run `npm run generate` in clients/typescript (with STATEHOUSE_BIN set) and commit the result";

test("the checked-in openapi.json is the document the server serves", async () => {
  const { json } = await render(await fetchDocument(server.baseUrl));
  assert.equal(readFileSync(DOCUMENT_PATH, "utf8"), json, REGENERATE);
});

test("the checked-in generated types are what openapi-typescript makes of the server's document", async () => {
  const { types } = await render(await fetchDocument(server.baseUrl));
  assert.equal(readFileSync(TYPES_PATH, "utf8"), types, REGENERATE);
});

test("the comparison notices a change: one more schema property changes the generated types", async () => {
  const document = (await fetchDocument(server.baseUrl)) as { components: { schemas: Record<string, { properties: Record<string, unknown> }> } };
  const before = (await render(document)).types;
  document.components.schemas.VersionBody!.properties.added_by_the_test = { type: "string" };
  const after = (await render(document)).types;
  assert.notEqual(after, before);
  assert.match(after, /added_by_the_test/);
});

test("the generated files use no word the repository forbids", () => {
  for (const file of [DOCUMENT_PATH, TYPES_PATH]) {
    const found = readFileSync(file, "utf8").split("\n").filter((line) => /\bissues?\b/i.test(line));
    assert.deepEqual(found, [], `${file} mentions a tracker; fix the server's document rather than the generated file`);
  }
});

test("tsc --noEmit (strict) passes on the sources, tests and examples", { timeout: 180_000 }, async () => {
  const tsc = join(ROOT, "node_modules", "typescript", "bin", "tsc");
  const result = await promisify(execFile)(process.execPath, [tsc, "--noEmit", "-p", join(ROOT, "tsconfig.json")], { cwd: ROOT }).then(
    () => ({ code: 0, out: "" }),
    (err: { code?: number; stdout?: string; stderr?: string }) => ({ code: err.code ?? 1, out: `${err.stdout ?? ""}${err.stderr ?? ""}` }),
  );
  assert.equal(result.code, 0, `tsc found errors:\n${result.out}`);
});
