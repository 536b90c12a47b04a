// The postcopy client's requests sent and not answered yet, by id: what a DATA frame belongs to,
// what each connection owes (the urgent one in requests, the background one in bytes, which is
// its window), and what goes out again when a connection is lost. The daemon's client keeps its
// PageRequests here, qemu-restore's range client its byte ranges: only these fields matter.

/** What the table needs of a request. */
export interface InFlightRequest {
  id: number;
  /** Sent on the urgent connection (else the background one). */
  urgent: boolean;
  bytes: number;
  sent: boolean;
}

export class InFlight<R extends InFlightRequest> {
  readonly byId = new Map<number, R>();
  /** Requests owed on the urgent connection. */
  urgent = 0;
  /** Bytes owed on the background connection. */
  backgroundBytes = 0;

  get size(): number {
    return this.byId.size;
  }

  /** Whether the urgent (or the background) connection owes us replies. */
  owes(urgent: boolean): boolean {
    return urgent ? this.urgent > 0 : this.backgroundBytes > 0;
  }

  add(req: R): void {
    req.sent = true;
    this.byId.set(req.id, req);
    if (req.urgent) this.urgent++;
    else this.backgroundBytes += req.bytes;
  }

  /** Forgets that a request was sent (reply complete, dropped, or its connection lost). */
  remove(req: R): void {
    if (!this.byId.delete(req.id)) return;
    req.sent = false;
    if (req.urgent) this.urgent--;
    else this.backgroundBytes -= req.bytes;
  }

  /** Forgets every request sent on the urgent (or the background) connection; returns them in the order they were asked for. */
  takeBack(urgent: boolean): R[] {
    const again: R[] = [];
    for (const req of this.byId.values()) if (req.urgent === urgent) again.push(req);
    for (const req of again) this.remove(req);
    return again.sort((a, b) => a.id - b.id);
  }
}
