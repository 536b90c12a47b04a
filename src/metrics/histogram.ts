// Fault service latency as a fixed array of power-of-two microsecond buckets (QEMU 10.1 reports
// postcopy fault latency the same way): recording is one clz32 and two adds, no allocation.

/** Bucket b counts samples of at most 2^b µs; the last bucket (+Inf) counts the rest. */
export const LATENCY_BUCKETS = 26; // 1 µs .. 2^24 µs (16.8 s), then +Inf
/** Slots: the buckets, then the sum of the samples (µs), then their count. */
export const HISTOGRAM_SLOTS = LATENCY_BUCKETS + 2;
const SUM = LATENCY_BUCKETS;
const COUNT = LATENCY_BUCKETS + 1;

export function newHistogram(): Float64Array {
  return new Float64Array(HISTOGRAM_SLOTS);
}

/** The bucket of a latency in µs: the smallest b with us <= 2^b. */
export function bucketOf(us: number): number {
  if (!(us > 1)) return 0;
  const b = 32 - Math.clz32(Math.ceil(us) - 1);
  return b < LATENCY_BUCKETS - 1 ? b : LATENCY_BUCKETS - 1;
}

/** Records `n` samples of `us` microseconds (n vCPUs that waited that long). */
export function observe(h: Float64Array, us: number, n = 1): void {
  h[bucketOf(us)]! += n;
  h[SUM]! += us * n;
  h[COUNT]! += n;
}

export function histogramCount(h: Float64Array): number {
  return h[COUNT]!;
}

export function histogramSumUs(h: Float64Array): number {
  return h[SUM]!;
}

/** Upper bound (µs) of bucket b; Infinity for the last. */
export function bucketBoundUs(b: number): number {
  return b >= LATENCY_BUCKETS - 1 ? Infinity : 2 ** b;
}

/** Adds histogram `from` into `into`. */
export function addHistogram(into: Float64Array, from: Float64Array): void {
  for (let i = 0; i < HISTOGRAM_SLOTS; i++) into[i]! += from[i]!;
}

/**
 * The q-quantile's bucket bound in µs from cumulative counts per bound (as scraped): the smallest
 * bound with at least q of the samples at or below it. NaN when there are no samples.
 */
export function quantileUs(bounds: readonly number[], cumulative: readonly number[], q: number): number {
  const total = cumulative[cumulative.length - 1] ?? 0;
  if (total === 0) return Number.NaN;
  for (let i = 0; i < bounds.length; i++) if (cumulative[i]! >= q * total) return bounds[i]!;
  return Infinity;
}
