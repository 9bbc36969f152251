// How storage values travel. Durable Objects store any structured-clone value;
// over HTTP a value is bytes with a content type, so:
//   - JSON-safe values are stored as JSON (application/json), readable by any client;
//   - top-level Uint8Array / ArrayBuffer as raw bytes (application/octet-stream);
//   - anything else structured clone carries (Date, Map, Set, bigint, typed
//     arrays, RegExp, Error, NaN/Infinity/-0, undefined, holes), also nested,
//     as a tagged JSON document under STRUCTURED_CONTENT_TYPE.
// The tagged encoding (also described in the README):
//   {"$date": <ms since epoch | null>}          {"$bigint": "<decimal>"}
//   {"$map": [[k, v], ...]}                      {"$set": [v, ...]}
//   {"$number": "NaN"|"Infinity"|"-Infinity"|"-0"}  {"$undefined": true}
//   {"$arraybuffer": "<base64>"}                 {"$typed": {"type": "Int32Array", "data": "<base64>"}}
//   {"$regexp": {"source": s, "flags": f}}       {"$error": {"name": n, "message": m, "stack"?: s}}
//   {"$sparse": {"length": n, "items": {"<index>": v}}}   {"$boxed": v}
//   {"$object": {...}} for a plain object with a key starting with "$", so user
//   data never reads as a tag; other objects are JSON objects of encoded values.

export const JSON_CONTENT_TYPE = "application/json";
export const BYTES_CONTENT_TYPE = "application/octet-stream";
/** Raw bytes that were put as an ArrayBuffer (read back as one); still octet-stream to other clients. */
export const ARRAYBUFFER_CONTENT_TYPE = "application/octet-stream; statehouse-type=arraybuffer";
export const STRUCTURED_CONTENT_TYPE = "application/vnd.statehouse.structured+json";

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: false });

/** A value ready for the wire: the body of a single PUT, or the fields of a batch put. */
export interface EncodedValue {
  contentType: string;
  bytes: Uint8Array;
  /** For batch puts: the JSON to send as `value` (JSON and structured values). */
  json?: unknown;
}

export function isJsonContentType(contentType: string): boolean {
  const essence = (contentType.split(";")[0] ?? "").trim().toLowerCase();
  return essence === "application/json" || essence === "text/json" || essence.endsWith("+json");
}

function essenceOf(contentType: string): string {
  return (contentType.split(";")[0] ?? "").trim().toLowerCase();
}

export function encodeValue(value: unknown): EncodedValue {
  if (value === undefined) {
    throw new TypeError("cannot put undefined: a missing key already reads as undefined (delete the key instead)");
  }
  if (value instanceof Uint8Array) {
    return { contentType: BYTES_CONTENT_TYPE, bytes: new Uint8Array(value.buffer, value.byteOffset, value.byteLength) };
  }
  if (value instanceof ArrayBuffer) {
    return { contentType: ARRAYBUFFER_CONTENT_TYPE, bytes: new Uint8Array(value.slice(0)) };
  }
  if (isJsonSafe(value, new Set())) {
    return { contentType: JSON_CONTENT_TYPE, bytes: encoder.encode(JSON.stringify(value)), json: value };
  }
  const tagged = toTagged(value, new Set());
  return { contentType: STRUCTURED_CONTENT_TYPE, bytes: encoder.encode(JSON.stringify(tagged)), json: tagged };
}

/** A stored value from its raw bytes and content type (single-key GET). */
export function decodeBytes(bytes: Uint8Array, contentType: string): unknown {
  const essence = essenceOf(contentType);
  if (essence === STRUCTURED_CONTENT_TYPE) return fromTagged(JSON.parse(decoder.decode(bytes)));
  if (isJsonContentType(contentType)) {
    const text = decoder.decode(bytes);
    try {
      return JSON.parse(text);
    } catch {
      // Another client stored text that is not JSON under a JSON type: the text is what there is.
      return text;
    }
  }
  if (essence.startsWith("text/")) return decoder.decode(bytes);
  return bytesResult(bytes, contentType);
}

/**
 * A stored value as listings and batch `get` results embed it: parsed JSON for
 * JSON types, a string for UTF-8 text, otherwise base64 with `encoding: "base64"`.
 */
export function decodeEmbedded(value: unknown, encoding: string | null | undefined, contentType: string): unknown {
  const essence = essenceOf(contentType);
  if (encoding === "base64") {
    return decodeBytes(base64ToBytes(String(value)), contentType);
  }
  if (essence === STRUCTURED_CONTENT_TYPE) {
    return fromTagged(typeof value === "string" ? JSON.parse(value) : value);
  }
  if (isJsonContentType(contentType)) return value;
  if (essence.startsWith("text/")) return value;
  // Bytes that happen to be UTF-8 arrive as a string: back to the same bytes.
  return bytesResult(encoder.encode(String(value)), contentType);
}

/** The raw bytes of an embedded value, for sending the same value back unchanged. */
export function embeddedToWire(value: unknown, encoding: string | null | undefined, contentType: string): { json?: unknown; base64?: string } {
  if (encoding === "base64") return { base64: String(value) };
  if (isJsonContentType(contentType)) return { json: value };
  // Text kept as the exact string; the server stores a string as its bytes for non-JSON types.
  return { json: String(value) };
}

function bytesResult(bytes: Uint8Array, contentType: string): Uint8Array | ArrayBuffer {
  if (/;\s*statehouse-type=arraybuffer\b/i.test(contentType)) {
    return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) as ArrayBuffer;
  }
  return bytes;
}

function isPlainObject(value: object): boolean {
  const proto = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

/** True when JSON.stringify / JSON.parse gives back an equal value. */
function isJsonSafe(value: unknown, ancestors: Set<object>): boolean {
  switch (typeof value) {
    case "string":
      return !hasLoneSurrogate(value);
    case "boolean":
      return true;
    case "number":
      return Number.isFinite(value) && !Object.is(value, -0);
    case "object": {
      if (value === null) return true;
      if (ancestors.has(value)) return false;
      ancestors.add(value);
      try {
        if (Array.isArray(value)) {
          if (Object.keys(value).length !== value.length) return false;
          for (let i = 0; i < value.length; i++) {
            if (!(i in value) || !isJsonSafe(value[i], ancestors)) return false;
          }
          return true;
        }
        if (!isPlainObject(value)) return false;
        for (const key of Object.keys(value)) {
          const item = (value as Record<string, unknown>)[key];
          if (!isJsonSafe(item, ancestors)) return false;
        }
        return true;
      } finally {
        ancestors.delete(value);
      }
    }
    default:
      return false;
  }
}

function hasLoneSurrogate(text: string): boolean {
  return /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/.test(text);
}

const TYPED_ARRAYS: Record<string, { new (buffer: ArrayBuffer): ArrayBufferView }> = {
  Int8Array,
  Uint8Array,
  Uint8ClampedArray,
  Int16Array,
  Uint16Array,
  Int32Array,
  Uint32Array,
  Float32Array,
  Float64Array,
  BigInt64Array,
  BigUint64Array,
  DataView,
};

function viewTypeName(view: ArrayBufferView): string {
  if (view instanceof DataView) return "DataView";
  // Node's Buffer is a Uint8Array; structured clone hands it back as one too.
  if (view instanceof Uint8Array && !(view instanceof Uint8ClampedArray)) return "Uint8Array";
  for (const name of Object.keys(TYPED_ARRAYS)) {
    if (view.constructor.name === name) return name;
  }
  return Object.getPrototypeOf(Object.getPrototypeOf(view))?.constructor?.name === "TypedArray" ? view.constructor.name : "Uint8Array";
}

function toTagged(value: unknown, ancestors: Set<object>): unknown {
  switch (typeof value) {
    case "undefined":
      return { $undefined: true };
    case "boolean":
      return value;
    case "string":
      if (hasLoneSurrogate(value)) {
        throw new TypeError("strings with unpaired surrogates cannot be stored: they have no UTF-8 form");
      }
      return value;
    case "number":
      if (Number.isNaN(value)) return { $number: "NaN" };
      if (value === Infinity) return { $number: "Infinity" };
      if (value === -Infinity) return { $number: "-Infinity" };
      if (Object.is(value, -0)) return { $number: "-0" };
      return value;
    case "bigint":
      return { $bigint: value.toString() };
    case "function":
    case "symbol":
      throw new TypeError(`a ${typeof value} cannot be stored (structured clone refuses it too)`);
    case "object":
      break;
  }
  if (value === null) return null;
  const object = value as object;
  if (ancestors.has(object)) {
    throw new TypeError("cannot store a value that contains itself: the tagged encoding has no references");
  }
  ancestors.add(object);
  try {
    if (object instanceof Date) return { $date: Number.isNaN(object.getTime()) ? null : object.getTime() };
    if (object instanceof RegExp) return { $regexp: { source: object.source, flags: object.flags } };
    if (object instanceof Map) return { $map: [...object].map(([k, v]) => [toTagged(k, ancestors), toTagged(v, ancestors)]) };
    if (object instanceof Set) return { $set: [...object].map((v) => toTagged(v, ancestors)) };
    if (object instanceof ArrayBuffer) return { $arraybuffer: bytesToBase64(new Uint8Array(object)) };
    if (ArrayBuffer.isView(object)) {
      const bytes = new Uint8Array(object.buffer, object.byteOffset, object.byteLength);
      return { $typed: { type: viewTypeName(object), data: bytesToBase64(bytes) } };
    }
    if (object instanceof Error) {
      const error: Record<string, string> = { name: object.name, message: object.message };
      if (typeof object.stack === "string") error.stack = object.stack;
      return { $error: error };
    }
    if (object instanceof Boolean || object instanceof Number || object instanceof String) {
      return { $boxed: toTagged(object.valueOf(), ancestors) };
    }
    if (Array.isArray(object)) {
      const dense = Object.keys(object).length === object.length && object.every((_, i) => i in object);
      if (dense) return object.map((v) => toTagged(v, ancestors));
      const items: Record<string, unknown> = {};
      for (const key of Object.keys(object)) items[key] = toTagged((object as unknown as Record<string, unknown>)[key], ancestors);
      return { $sparse: { length: object.length, items } };
    }
    const out: Record<string, unknown> = {};
    let escaped = false;
    for (const key of Object.keys(object)) {
      if (key.startsWith("$")) escaped = true;
      out[key] = toTagged((object as Record<string, unknown>)[key], ancestors);
    }
    return escaped ? { $object: out } : out;
  } finally {
    ancestors.delete(object);
  }
}

function fromTagged(value: unknown): unknown {
  if (value === null || typeof value !== "object") return value;
  if (Array.isArray(value)) return value.map(fromTagged);
  const record = value as Record<string, unknown>;
  const keys = Object.keys(record);
  if (keys.length === 1 && keys[0]!.startsWith("$")) {
    const tag = keys[0]!;
    const body = record[tag];
    switch (tag) {
      case "$undefined":
        return undefined;
      case "$number":
        return body === "-0" ? -0 : Number(body);
      case "$bigint":
        return BigInt(String(body));
      case "$date":
        return new Date(body === null ? NaN : Number(body));
      case "$regexp": {
        const { source, flags } = body as { source: string; flags: string };
        return new RegExp(source, flags);
      }
      case "$map":
        return new Map((body as [unknown, unknown][]).map(([k, v]) => [fromTagged(k), fromTagged(v)]));
      case "$set":
        return new Set((body as unknown[]).map(fromTagged));
      case "$arraybuffer": {
        const bytes = base64ToBytes(String(body));
        return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
      }
      case "$typed": {
        const { type, data } = body as { type: string; data: string };
        const bytes = base64ToBytes(data);
        const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) as ArrayBuffer;
        const View = TYPED_ARRAYS[type] ?? Uint8Array;
        return new View(buffer);
      }
      case "$error": {
        const { name, message, stack } = body as { name: string; message: string; stack?: string };
        const Kind = ({ TypeError, RangeError, SyntaxError, ReferenceError, EvalError, URIError } as Record<string, ErrorConstructor>)[name] ?? Error;
        const error = new Kind(message);
        if (error.name !== name) error.name = name;
        // As structured clone does: the stack of where it was made, not of where it was read.
        if (stack !== undefined) Object.defineProperty(error, "stack", { value: stack, writable: true, configurable: true, enumerable: false });
        else delete error.stack;
        return error;
      }
      case "$boxed":
        return Object(fromTagged(body));
      case "$sparse": {
        const { length, items } = body as { length: number; items: Record<string, unknown> };
        const array = new Array(length);
        for (const [index, item] of Object.entries(items)) array[Number(index)] = fromTagged(item);
        return array;
      }
      case "$object": {
        const out: Record<string, unknown> = {};
        for (const [k, v] of Object.entries(body as Record<string, unknown>)) out[k] = fromTagged(v);
        return out;
      }
    }
  }
  const out: Record<string, unknown> = {};
  for (const key of keys) out[key] = fromTagged(record[key]);
  return out;
}

export function bytesToBase64(bytes: Uint8Array): string {
  let binary = "";
  const chunk = 0x8000;
  for (let i = 0; i < bytes.length; i += chunk) {
    binary += String.fromCharCode(...bytes.subarray(i, i + chunk));
  }
  return btoa(binary);
}

export function base64ToBytes(text: string): Uint8Array {
  const binary = atob(text.trim());
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

export function utf8Length(text: string): number {
  return encoder.encode(text).length;
}

/**
 * Orders keys as the server (and Durable Objects) do: by their UTF-8 bytes,
 * which is code point order, not JavaScript's UTF-16 code unit order (the two
 * differ for characters above U+FFFF against U+E000-U+FFFF).
 */
export function compareKeys(a: string, b: string): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    const x = a.charCodeAt(i);
    const y = b.charCodeAt(i);
    if (x === y) continue;
    const xs = x >= 0xd800 && x <= 0xdfff;
    const ys = y >= 0xd800 && y <= 0xdfff;
    // A surrogate is part of a code point above U+FFFF: after every unit that is a code point itself.
    if (xs !== ys) return xs ? 1 : -1;
    return x - y;
  }
  return a.length - b.length;
}
