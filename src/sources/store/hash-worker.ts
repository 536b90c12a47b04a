// Worker thread of chunk-hasher.ts: hashes its range of chunks, answers once.
import { type HashJob, hashChunks } from "./chunk-hash-core.ts";

declare const self: Worker;

self.onmessage = (e: MessageEvent<HashJob>) => {
  try {
    postMessage(hashChunks(e.data));
  } catch (err) {
    postMessage({ error: (err as Error).message });
  }
};
