// Fault-around window planning, shared by both sinks (userfaultfd and the QEMU stream): a fault
// on pages [first, end) brings the aligned window of `around` pages that holds it, so a guest
// walking memory finds its next pages already there. Plain functions of numbers: the uffd fault
// path calls them per fault and must not allocate.

/** First page of the window: `first` rounded down to a multiple of `around` (1 = no window). */
export function windowStart(first: number, around: number): number {
  return around > 1 ? first - (first % around) : first;
}

/** End (exclusive) of the window that starts at `start`: at least `end`, at most `pages`. */
export function windowEnd(start: number, end: number, around: number, pages: number): number {
  return around > 1 ? Math.min(Math.max(start + around, end), pages) : end;
}
