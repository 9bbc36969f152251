import type { components } from "./generated/openapi.js";
import type { StatehouseObject } from "./object.js";
import { parseEtag } from "./object.js";

type Schemas = components["schemas"];
export type BlobWritten = Schemas["BlobWritten"];
export type ListedBlob = Schemas["ListedBlob"];
export type ListBlobsPage = Schemas["ListBlobsBody"];
export type PresignResult = Schemas["PresignBody"];

export type BlobBody = Uint8Array | ArrayBuffer | Blob | string | ReadableStream<Uint8Array>;

export interface BlobPutOptions {
  contentType?: string;
  cacheControl?: string;
  contentDisposition?: string;
  /** Kept as `x-statehouse-meta-<name>` headers; visible ASCII values. */
  metadata?: Record<string, string>;
  /** Replace only if the blob's version is this one. */
  ifMatch?: number;
  /** `"*"`: create only. */
  ifNoneMatch?: "*";
}

/** A byte range, as R2 takes it: `{offset, length?}` or `{suffix}` (the last n bytes). */
export type BlobRange = { offset: number; length?: number } | { suffix: number };

export interface BlobMetadata {
  name: string;
  size: number;
  version: number;
  etag: string;
  sha256: string | undefined;
  contentType: string;
  cacheControl: string | undefined;
  contentDisposition: string | undefined;
  metadata: Record<string, string>;
}

export interface BlobObject extends BlobMetadata {
  /** The bytes sent: all of them, or the range asked for. */
  body: ReadableStream<Uint8Array>;
  /** Present for a ranged read: where the bytes sit in the blob. */
  range: { offset: number; length: number } | undefined;
  arrayBuffer(): Promise<ArrayBuffer>;
  bytes(): Promise<Uint8Array>;
  text(): Promise<string>;
}

/** The commit body after a presigned PUT (the document's `CommitRequest`, in camelCase, with its conditions). */
export interface BlobCommit {
  uploadKey: string;
  contentType?: string;
  cacheControl?: string;
  contentDisposition?: string;
  metadata?: Record<string, string>;
  ifMatch?: number;
  ifNoneMatch?: "*";
}

/** An object's blobs: large binary payloads streamed to the object store, visible once committed. */
export class Blobs {
  constructor(private readonly object: StatehouseObject) {}

  /**
   * Uploads a blob. Bytes, strings and Blobs are retried on 503/429; a
   * ReadableStream is sent once (it cannot be replayed).
   */
  async put(name: string, body: BlobBody, options: BlobPutOptions = {}): Promise<BlobWritten> {
    const headers: Record<string, string | undefined> = {
      "content-type": options.contentType ?? (body instanceof Blob && body.type ? body.type : typeof body === "string" ? "text/plain; charset=utf-8" : "application/octet-stream"),
      "cache-control": options.cacheControl,
      "content-disposition": options.contentDisposition,
      "if-match": options.ifMatch === undefined ? undefined : `"${options.ifMatch}"`,
      "if-none-match": options.ifNoneMatch,
    };
    for (const [key, value] of Object.entries(options.metadata ?? {})) headers[`x-statehouse-meta-${key.toLowerCase()}`] = value;
    const payload = body instanceof ArrayBuffer ? new Uint8Array(body) : body;
    const { response } = await this.object.client.request({ method: "PUT", path: this.path(name), body: payload, headers });
    return (await response.json()) as BlobWritten;
  }

  /** Downloads a blob, whole or a range; null when there is no such blob. */
  async get(name: string, options: { range?: BlobRange } = {}): Promise<BlobObject | null> {
    const { response } = await this.object.client.request({
      method: "GET",
      path: this.path(name),
      headers: { range: options.range === undefined ? undefined : rangeHeader(options.range) },
      accept: [404],
    });
    if (response.status === 404) {
      await response.body?.cancel();
      return null;
    }
    const meta = metadataOf(name, response.headers);
    const contentRange = response.headers.get("content-range")?.match(/^bytes (\d+)-(\d+)\/(\d+)$/);
    const range = contentRange ? { offset: Number(contentRange[1]), length: Number(contentRange[2]) - Number(contentRange[1]) + 1 } : undefined;
    if (contentRange) meta.size = Number(contentRange[3]);
    const body = response.body ?? new ReadableStream<Uint8Array>({ start: (c) => c.close() });
    let consumed: Promise<ArrayBuffer> | undefined;
    const buffer = () => (consumed ??= new Response(body).arrayBuffer());
    return {
      ...meta,
      body,
      range,
      arrayBuffer: buffer,
      bytes: async () => new Uint8Array(await buffer()),
      text: async () => new TextDecoder().decode(await buffer()),
    };
  }

  /** A blob's metadata without its bytes; null when there is no such blob. */
  async head(name: string): Promise<BlobMetadata | null> {
    const { response } = await this.object.client.request({ method: "HEAD", path: this.path(name), accept: [404] });
    if (response.status === 404) return null;
    return metadataOf(name, response.headers);
  }

  /** Deletes a blob; false when there was none. */
  async delete(name: string, options: { ifMatch?: number } = {}): Promise<boolean> {
    const { response } = await this.object.client.request({
      method: "DELETE",
      path: this.path(name),
      headers: { "if-match": options.ifMatch === undefined ? undefined : `"${options.ifMatch}"` },
    });
    return ((await response.json()) as Schemas["DeletedBody"]).deleted;
  }

  /** One page of blobs in name order. */
  async list(options: { prefix?: string; limit?: number; cursor?: string } = {}): Promise<ListBlobsPage> {
    const { response } = await this.object.client.request({
      method: "GET",
      path: `${this.object.path}/blobs`,
      query: { prefix: options.prefix, limit: options.limit, cursor: options.cursor },
    });
    return (await response.json()) as ListBlobsPage;
  }

  /** Every blob (name order), following cursors. */
  async *all(options: { prefix?: string; pageSize?: number } = {}): AsyncGenerator<ListedBlob> {
    let cursor: string | undefined;
    do {
      const page = await this.list({ prefix: options.prefix, limit: options.pageSize, cursor });
      yield* page.items;
      cursor = page.cursor ?? undefined;
    } while (cursor !== undefined);
  }

  /**
   * A presigned URL to GET the blob or PUT new bytes straight to the object
   * store (S3-compatible stores only: a local-folder server answers 409
   * `conflict`). After a PUT, `commit()` makes the upload the blob.
   */
  async presign(name: string, options: { method: "GET" | "PUT"; expiresIn?: number }): Promise<PresignResult> {
    const body: Schemas["PresignRequest"] = { method: options.method };
    if (options.expiresIn !== undefined) body.expires_in = options.expiresIn;
    const { response } = await this.object.client.request({ method: "POST", path: `${this.path(name)}/presign`, json: body, retry: "idempotent" });
    return (await response.json()) as PresignResult;
  }

  /** Makes bytes uploaded to a presigned PUT URL the blob's content. */
  async commit(name: string, commit: BlobCommit): Promise<BlobWritten> {
    const body: Record<string, unknown> = { upload_key: commit.uploadKey };
    if (commit.contentType !== undefined) body.content_type = commit.contentType;
    if (commit.cacheControl !== undefined) body.cache_control = commit.cacheControl;
    if (commit.contentDisposition !== undefined) body.content_disposition = commit.contentDisposition;
    if (commit.metadata !== undefined) body.metadata = commit.metadata;
    const { response } = await this.object.client.request({
      method: "POST",
      path: `${this.path(name)}/commit`,
      json: body,
      headers: {
        "if-match": commit.ifMatch === undefined ? undefined : `"${commit.ifMatch}"`,
        "if-none-match": commit.ifNoneMatch,
      },
      // Committing one upload key twice leaves the same blob.
      retry: "idempotent",
    });
    return (await response.json()) as BlobWritten;
  }

  private path(name: string): string {
    if (name === "" || name.startsWith("/") || name.split("/").some((s) => s === "" || s === "." || s === "..")) {
      throw new RangeError(`blob names are relative paths without empty, "." or ".." segments: ${JSON.stringify(name)}`);
    }
    return `${this.object.path}/blobs/${name.split("/").map(encodeURIComponent).join("/")}`;
  }
}

function rangeHeader(range: BlobRange): string {
  if ("suffix" in range) {
    if (!(range.suffix > 0)) throw new RangeError("a suffix range needs at least one byte");
    return `bytes=-${range.suffix}`;
  }
  if (!(range.offset >= 0)) throw new RangeError("a range offset is 0 or more");
  if (range.length === undefined) return `bytes=${range.offset}-`;
  if (!(range.length > 0)) throw new RangeError("a range length is 1 or more");
  return `bytes=${range.offset}-${range.offset + range.length - 1}`;
}

function metadataOf(name: string, headers: Headers): BlobMetadata {
  const metadata: Record<string, string> = {};
  headers.forEach((value, key) => {
    if (key.startsWith("x-statehouse-meta-")) metadata[key.slice("x-statehouse-meta-".length)] = value;
  });
  const version = parseEtag(headers.get("etag"));
  return {
    name,
    size: Number(headers.get("content-length") ?? 0),
    version,
    etag: `"${version}"`,
    sha256: headers.get("x-statehouse-sha256") ?? undefined,
    contentType: headers.get("content-type") ?? "application/octet-stream",
    cacheControl: headers.get("cache-control") ?? undefined,
    contentDisposition: headers.get("content-disposition") ?? undefined,
    metadata,
  };
}
