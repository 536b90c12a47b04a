// What `page-server --metrics` exposes: clients, requests, bytes sent, error frames by code.
import type { PageServer } from "../postcopy/page-server.ts";
import { Exposition } from "./exposition.ts";

export function renderPageServerMetrics(server: PageServer): string {
  const m = server.metrics();
  const x = new Exposition();
  x.family("snapload_page_server_clients", "gauge", "Client connections open now.").sample("snapload_page_server_clients", undefined, m.clients);
  x.family("snapload_page_server_clients_total", "counter", "Client connections accepted.").sample("snapload_page_server_clients_total", undefined, m.clientsTotal);
  x.family("snapload_page_server_requests_total", "counter", "Page requests received.").sample("snapload_page_server_requests_total", undefined, m.requests);
  x.family("snapload_page_server_sent_bytes_total", "counter", "Bytes of replies sent (frames with their headers).")
    .sample("snapload_page_server_sent_bytes_total", undefined, m.bytes);
  x.family("snapload_page_server_errors_total", "counter", "Error frames sent to clients, by protocol error code.");
  for (const [code, n] of Object.entries(m.errors)) x.sample("snapload_page_server_errors_total", { code }, n);
  return x.text();
}
