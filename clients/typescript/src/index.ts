export { Statehouse } from "./client.js";
export type {
  StatehouseOptions,
  RetryOptions,
  TokenSource,
  RetryPolicy,
  ObjectSummary,
  ListObjectsPage,
  ExportResult,
  CommittedSnapshot,
  AnalyticsTables,
  TableInfo,
} from "./client.js";
export { StatehouseObject, MAX_BATCH_OPS, MAX_EVENTS, MAX_KEY_BYTES } from "./object.js";
export type { ObjectInfo, DeleteAllResult, BatchOp, BatchResult, BatchResponse, EventsRecorded, RawEntry, Conditions, ListKeysPage, ListedKey, HistoryPage, HistoryPoint, RestoreResult } from "./object.js";
export { StatehouseStorage, StatehouseTransaction } from "./storage.js";
export type { StorageOperations, StorageGetOptions, StoragePutOptions, StorageListOptions, TransactionOptions } from "./storage.js";
export { Blobs } from "./blobs.js";
export type { BlobBody, BlobPutOptions, BlobRange, BlobMetadata, BlobObject, BlobWritten, ListedBlob, ListBlobsPage, PresignResult, BlobCommit } from "./blobs.js";
export {
  StatehouseError,
  StatehouseNetworkError,
  TransactionConflictError,
  CommitOutcomeUnknownError,
  PROBLEM_BASE,
} from "./errors.js";
export type { Problem } from "./errors.js";
export {
  STRUCTURED_CONTENT_TYPE,
  JSON_CONTENT_TYPE,
  BYTES_CONTENT_TYPE,
  ARRAYBUFFER_CONTENT_TYPE,
  encodeValue,
  decodeBytes,
  compareKeys,
} from "./values.js";
export type { EncodedValue } from "./values.js";
export type { components, paths, operations } from "./generated/openapi.js";
