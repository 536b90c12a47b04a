// The order a recorded working set is prefetched in, shared by both sinks: the recorded order,
// one step of pages at a time, each step sorted so neighbours in the image go together (one
// ioctl, one record run, one fetch), while the recorded order holds from one step to the next
// (a guest touching a cluster in random order records it shuffled).

/** Recorded pages per prefetch step. */
export const PREFETCH_STEP_PAGES = 128;

export class PrefetchOrder {
  #pos = 0;
  readonly #batch = new Uint32Array(PREFETCH_STEP_PAGES);

  constructor(private readonly recorded: Uint32Array) {}

  get done(): boolean {
    return this.#pos >= this.recorded.length;
  }

  /** The next step's pages (image page numbers), sorted; a view valid until the next call. */
  step(): Uint32Array {
    const take = Math.min(PREFETCH_STEP_PAGES, this.recorded.length - this.#pos);
    const out = this.#batch.subarray(0, take);
    out.set(this.recorded.subarray(this.#pos, this.#pos + take));
    out.sort();
    this.#pos += take;
    return out;
  }

  /** Gives the last step back (it could not be finished: it runs again next time). */
  retry(count: number): void {
    this.#pos -= count;
  }
}
