// Worker thread of chunk-hasher.ts: hashes the batches of chunks it claims, posting each when
// done, then { done }; an { error } ends it early (the batches posted before it stand).
import { type HashJob, hashChunks } from "./chunk-hash-core.ts";

declare const self: Worker;

self.onmessage = (e: MessageEvent<HashJob>) => {
  try {
    hashChunks(e.data, (r) => postMessage(r));
    postMessage({ done: true });
  } catch (err) {
    postMessage({ error: (err as Error).message });
  }
};
