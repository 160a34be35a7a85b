/** Counters and gauges in Prometheus text format; enough for /metrics, no dependency. */
export class Metrics {
  private readonly counters = new Map<string, number>();
  private readonly gauges = new Map<string, number>();

  inc(name: string, by = 1, labels: Record<string, string> = {}): void {
    const k = key(name, labels);
    this.counters.set(k, (this.counters.get(k) ?? 0) + by);
  }

  /** A counter kept elsewhere (e.g. the store's request counts), reported as it stands. */
  setTotal(name: string, value: number, labels: Record<string, string> = {}): void {
    this.counters.set(key(name, labels), value);
  }

  set(name: string, value: number, labels: Record<string, string> = {}): void {
    this.gauges.set(key(name, labels), value);
  }

  get(name: string, labels: Record<string, string> = {}): number {
    const k = key(name, labels);
    return this.counters.get(k) ?? this.gauges.get(k) ?? 0;
  }

  render(): string {
    const lines: string[] = [];
    const emit = (kind: string, map: Map<string, number>) => {
      const seen = new Set<string>();
      for (const [k, v] of [...map].sort()) {
        const name = k.split("{")[0];
        if (!seen.has(name)) lines.push(`# TYPE ${name} ${kind}`);
        seen.add(name);
        lines.push(`${k} ${v}`);
      }
    };
    emit("counter", this.counters);
    emit("gauge", this.gauges);
    return lines.join("\n") + "\n";
  }
}

function key(name: string, labels: Record<string, string>): string {
  const parts = Object.entries(labels).map(([k, v]) => `${k}="${v.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n")}"`);
  return parts.length ? `${name}{${parts.join(",")}}` : name;
}
