// The store commands in `snapload help` (kept apart so the CLI loads no store code to print it).
export const STORE_USAGE = `  snapload push FILE STORE/NAME [options]
      Put a raw image or a QEMU mapped-ram file (its --ramblock, default the largest) into a
      snapshot store: STORE is file://DIR, s3://BUCKET[/PREFIX] (credentials from AWS_* or
      ~/.aws) or, read-only for serve/pull/inspect, http(s)://URL. Chunks the store already
      holds are not uploaded again; the manifest is written last.
      --chunk-size N          256k|1m|2m|4m (default 256k)
      --level N               zstd level (default 1)
      --parallel N            uploads in flight (default 8)
      --working-set FILE      a recorded working set (serve --record), prefetched first on restore
      --s3-endpoint URL       S3-compatible endpoint (Ceph RGW, MinIO, ...); path-style requests
  snapload pull STORE/NAME FILE [--s3-endpoint URL] [--parallel N]
      Rebuild the raw image from a store (every chunk verified).
  snapload inspect STORE/NAME [--json] [--s3-endpoint URL]
      Geometry, chunks, stored vs logical bytes, dedup and compression of a stored snapshot.
`;
