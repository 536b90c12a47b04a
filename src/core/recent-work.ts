// Recent work per event-loop token, for serving the fds of a contended turn fairly: the fd that
// did the least work lately goes first (a VM with a few faults is not queued behind VMs streaming
// theirs). Work is what the handler reports (pages installed), halving every HALF_LIFE_MS, so an
// fd that was busy a while ago is not held back for it now, and one skipped in a turn moves up.

/**
 * Long enough that a VM restoring a small working set (a few thousand pages) stays ahead of VMs
 * streaming faults for its whole restore; short enough that a VM that starts a big restore
 * beside busy ones gets ahead of them for tens of milliseconds at most.
 */
export const HALF_LIFE_MS = 50;

export class RecentWork {
  /** Per token: work (units) as of `at`, and when (performance.now()). */
  private work = new Float64Array(64);
  private at = new Float64Array(64);
  /** Scratch of order(): each candidate's decayed work. */
  private keys = new Float64Array(64);

  /** A new fd took the token: it starts with no history. */
  reset(token: number): void {
    if (token >= this.work.length) this.grow(token);
    this.work[token] = 0;
    this.at[token] = 0;
  }

  /** The token's handler did `units` of work, ending at now. */
  charge(token: number, now: number, units: number): void {
    if (token >= this.work.length) this.grow(token);
    this.work[token] = this.decayed(token, now) + units;
    this.at[token] = now;
  }

  /** The token's work as of now. */
  decayed(token: number, now: number): number {
    const w = this.work[token]!;
    return w === 0 ? 0 : w * 2 ** ((this.at[token]! - now) / HALF_LIFE_MS);
  }

  /**
   * Sorts idx[0..m) (event indexes) by their token's recent work, least first; ties keep epoll's
   * order. tokenOf(i) gives event i's token. Insertion sort: m is the number of busy VMs.
   */
  order(idx: Int32Array, m: number, tokenOf: (i: number) => number, now: number): void {
    if (m > this.keys.length) this.keys = new Float64Array(Math.max(m, this.keys.length * 2));
    const keys = this.keys;
    for (let k = 0; k < m; k++) keys[k] = this.decayed(tokenOf(idx[k]!), now);
    for (let k = 1; k < m; k++) {
      const key = keys[k]!;
      const v = idx[k]!;
      let j = k - 1;
      while (j >= 0 && keys[j]! > key) {
        keys[j + 1] = keys[j]!;
        idx[j + 1] = idx[j]!;
        j--;
      }
      keys[j + 1] = key;
      idx[j + 1] = v;
    }
  }

  private grow(token: number): void {
    const size = Math.max(token + 1, this.work.length * 2);
    const w = new Float64Array(size);
    w.set(this.work);
    this.work = w;
    const a = new Float64Array(size);
    a.set(this.at);
    this.at = a;
  }
}
