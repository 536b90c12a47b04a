// When to busy-poll for the next fault instead of sleeping in epoll_wait.
//
// A spin pays off only when the next fault comes within the budget: a guest on another CPU that
// faults again at once is then served without a cross-CPU wake-up. When it does not pay — the
// guest is thinking, or there is no guest — every spin burns the whole budget. So the policy
// learns from its own outcome: it spins only right after a turn that served something, stops
// after MAX_MISSES spins in a row caught nothing, and then probes again at growing intervals
// (so a workload that changes is noticed, but a daemon whose spins never pay spends almost
// nothing on them). An idle daemon never spins: nothing was served on the turn before.
// (The spin itself yields the CPU between polls — see sl_epoll_spin — so a vCPU that shares the
// handler's CPU is not held off by it.)

/** Consecutive spins that caught nothing before spinning stops. */
const MAX_MISSES = 2;
/** First and last distance, in sleeps, between probe spins once spinning has stopped. */
const PROBE_FIRST = 16;
const PROBE_MAX = 4096;

export class SpinPolicy {
  /** Spins that caught an event / caught nothing (for the stats and the benchmark). */
  hits = 0;
  misses = 0;
  private missRun = 0;
  private probeEvery = PROBE_FIRST;
  private sleepsUntilProbe = 0;

  /** maxUs: the budget of one spin in microseconds; 0 disables spinning. */
  constructor(readonly maxUs: number) {}

  /** Microseconds to spin before the next blocking wait; `active`: the last turn served something. */
  budget(active: boolean): number {
    if (this.maxUs <= 0 || !active) return 0;
    if (this.missRun < MAX_MISSES) return this.maxUs;
    // Backed off: spin once every probeEvery sleeps to see whether spinning pays again.
    if (this.sleepsUntilProbe > 0) {
      this.sleepsUntilProbe--;
      return 0;
    }
    return this.maxUs;
  }

  /** The spin caught an event. */
  hit(): void {
    this.hits++;
    this.missRun = 0;
    this.probeEvery = PROBE_FIRST;
  }

  /** The spin ran out with nothing ready. */
  miss(): void {
    this.misses++;
    this.missRun++;
    if (this.missRun > MAX_MISSES) this.probeEvery = Math.min(PROBE_MAX, this.probeEvery * 2);
    if (this.missRun >= MAX_MISSES) this.sleepsUntilProbe = this.probeEvery;
  }
}
