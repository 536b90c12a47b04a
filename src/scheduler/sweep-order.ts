// The background sweep's order, shared by both sinks: every page of every unit (a uffd region,
// a QEMU RAM block), in spans, one pass after another; after a guest's fault or request the
// sweep jumps to the page after it, so a guest walking memory finds the pages ahead of it
// already there. Pages it jumped over are taken by a later pass. The sweep only proposes spans:
// which pages of a span still need moving is the sink's business. No allocation per span.

export class SweepOrder {
  /** The span `next()` proposed: pages [from, to) of unit `unit`. */
  unit = 0;
  from = 0;
  to = 0;
  #unit = 0;
  #page = 0;
  #passes = 0;

  /** `units`: how many; `pages(u)`: pages of unit u; `span(u)`: pages per span in unit u. */
  constructor(
    private readonly units: number,
    private readonly pages: (unit: number) => number,
    private readonly span: (unit: number) => number,
  ) {}

  /** Passes begun so far (the first pass is pass 1 once `next` ran). */
  get passes(): number {
    return this.#passes;
  }

  /** The guest just faulted on (or asked for) pages of `unit` ending before `page`: continue from there. */
  follow(unit: number, page: number): void {
    this.#unit = unit;
    this.#page = page;
  }

  /** Skips the rest of the current unit (its pages went away, or it is done). */
  skipUnit(): void {
    this.#unit++;
    this.#page = 0;
  }

  /** The last span could not be moved now (e.g. an event to read first): propose it again next. */
  again(): void {
    this.#unit = this.unit;
    this.#page = this.from;
  }

  /**
   * Proposes the next span (in `unit`/`from`/`to`) and moves past it. Returns false at the end
   * of a pass; the next call starts a new pass from the first unit. `done(u)` lets a unit with
   * nothing left be skipped whole.
   */
  next(done?: (unit: number) => boolean): boolean {
    if (this.#passes === 0) this.#passes = 1;
    for (;;) {
      if (this.#unit >= this.units) {
        this.#unit = 0;
        this.#page = 0;
        this.#passes++;
        return false;
      }
      const n = this.pages(this.#unit);
      if (this.#page >= n || (done !== undefined && done(this.#unit))) {
        this.skipUnit();
        continue;
      }
      this.unit = this.#unit;
      this.from = this.#page;
      this.to = Math.min(n, this.#page + Math.max(1, this.span(this.#unit)));
      this.#page = this.to;
      return true;
    }
  }
}
